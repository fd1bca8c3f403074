"""The scale-out deployment (issue 12) is well-formed and holds together, checked offline.

* every manifest in deploy/k8s/ validates against the Kubernetes API schema (kubernetes-validate
  bundles the OpenAPI-derived JSON schemas per Kubernetes version; strict: unknown fields fail),
  and a deliberately broken copy does not;
* the pieces agree: kustomization lists every manifest, the proxy's upstream names are the
  StatefulSet's pods, the replicas point at the Redis Service, grace periods cover the drain;
* deploy/compose.scale.yaml has the documented structure (PyYAML; no Docker engine here);
* the nginx template routes on ``$http_lstm_session_id`` to ``grpc_pass``, the committed copies
  are its current renders, and ``nginx -t`` accepts a render (Debian's package ``nginx``).
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NGINX = DEPLOY / "nginx"
COMPOSE = DEPLOY / "compose.scale.yaml"

# The oldest release the manifests are meant for (grpc probes are GA from 1.27) and the newest
# whose schemas the installed kubernetes-validate bundles.
K8S_VERSIONS = ("1.28", kubernetes_validate.latest_version())


def _render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_nginx_render", NGINX / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in _manifest_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc:
                docs.append((f"{path.name}#{i}", doc))
    return docs


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for _, d in _documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _schema_error(doc: dict[str, Any], version: str) -> str | None:
    """None if ``doc`` validates (strict) against Kubernetes ``version``, else one line saying
    where and why. A kind or apiVersion with no schema is an error too (a typo there must not
    skip the check)."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(top)"
        return f"{where}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return e.message
    return None


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


# --- Kubernetes: schema -------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("where", [w for w, _ in _documents()])
def test_manifest_validates_against_the_kubernetes_schema(where: str, version: str):
    error = _schema_error(dict(_documents())[where], version)
    assert error is None, f"{where} against Kubernetes {version}: {error}"


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("replicas is a word", "spec.replicas: 'three' is not of type 'integer'"),
        ("unknown container field", "'imagePulPolicy' was unexpected"),
        (
            "probe port is a list",
            "readinessProbe.httpGet.port: [8000] is not valid under any of the given schemas",
        ),
        ("unknown kind", "Couldn't find schema for kind StatefullSet"),
    ],
)
def test_a_broken_manifest_is_rejected(breakage: str, expected: str):
    broken = copy.deepcopy(_one("StatefulSet"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    if breakage == "replicas is a word":
        broken["spec"]["replicas"] = "three"
    elif breakage == "unknown container field":
        container["imagePulPolicy"] = container.pop("imagePullPolicy")
    elif breakage == "probe port is a list":
        container["readinessProbe"]["httpGet"]["port"] = [8000]
    else:
        broken["kind"] = "StatefullSet"
    error = _schema_error(broken, K8S_VERSIONS[0])
    assert error is not None and expected in error, error


def test_every_manifest_is_in_the_kustomization():
    k = _kustomization()
    assert sorted(k["resources"]) == sorted(p.name for p in _manifest_files())
    for gen in k.get("configMapGenerator", []):
        for f in gen["files"]:
            assert (K8S / f).is_file(), f"configMapGenerator names a missing file {f}"


# --- Kubernetes: the pieces agree ---------------------------------------------------------------


def _upstream_servers(conf: str) -> list[str]:
    upstream = re.search(r"upstream replicas \{(.*?)\n    \}", conf, re.S)
    assert upstream, "no `upstream replicas` block"
    return re.findall(r"^\s*server\s+(\S+)", upstream.group(1), re.M)


def test_proxy_routes_to_each_statefulset_pod_by_name():
    ns = _kustomization()["namespace"]
    assert _one("Namespace")["metadata"]["name"] == ns
    sts = _one("StatefulSet")
    headless = _one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert (
        headless["spec"]["selector"].items()
        <= sts["spec"]["template"]["metadata"]["labels"].items()
    )
    grpc_port = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
    servers = _upstream_servers((K8S / "nginx.conf").read_text(encoding="utf-8"))
    name = sts["metadata"]["name"]
    svc = headless["metadata"]["name"]
    expected = [
        f"{name}-{i}.{svc}.{ns}.svc.cluster.local:{grpc_port}"
        for i in range(sts["spec"]["replicas"])
    ]
    assert servers == expected, "render nginx.conf again with the StatefulSet's replicas"


def test_proxy_mounts_the_generated_config():
    proxy = _one("Deployment", "lstm-serve-proxy")
    pod = proxy["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    generated = {g["name"] for g in _kustomization()["configMapGenerator"]}
    mounts = pod["containers"][0]["volumeMounts"]
    conf = next(m for m in mounts if m["mountPath"] == "/etc/nginx/nginx.conf")
    assert volumes[conf["name"]]["configMap"]["name"] in generated
    assert conf["subPath"] == "nginx.conf"
    # The configuration keeps its pid file and temporary folders in /tmp: it must be writable.
    assert any(m["mountPath"] == "/tmp" for m in mounts)
    proxy_svc = _one("Service", "lstm-serve")
    assert proxy_svc["spec"]["selector"].items() <= _pod_labels(proxy).items()


def test_replicas_share_the_redis_service_and_drain_inside_their_grace():
    sts = _one("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    redis_svc = _one("Service", "redis")
    port = redis_svc["spec"]["ports"][0]["port"]
    assert env["LSTM_SERVE_STATE_STORE"] == f"redis://{redis_svc['metadata']['name']}:{port}/0"
    assert redis_svc["spec"]["selector"].items() <= _pod_labels(_one("Deployment", "redis")).items()
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = int(pre_stop[1]) + float(env["LSTM_SERVE_DRAIN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > needed


def test_probes_use_kserve_http_health_on_the_port_the_image_serves_it():
    """Startup and readiness on /v2/health/ready, liveness on /v2/health/live, on the container
    port that is the image's LSTM_SERVE_HTTP_PORT (EXPOSEd), which the pod does not turn off."""
    (container,) = _one("StatefulSet")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready"}
    paths["livenessProbe"] = "/v2/health/live"
    for probe, path in paths.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] == "http", probe
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    image_port = re.search(r"LSTM_SERVE_HTTP_PORT=(\d+)", dockerfile)
    assert image_port, "the image does not turn KServe v2 HTTP on"
    assert ports["http"] == int(image_port[1])
    exposed = re.search(r"^EXPOSE (.*)$", dockerfile, re.M)
    assert exposed and image_port[1] in exposed[1].split()
    assert _env(container).get("LSTM_SERVE_HTTP_PORT", image_port[1]) == image_port[1]
    headless = _one("Service", "lstm-serve-pods")
    assert {"name": "http", "port": 8000, "targetPort": "http", "appProtocol": "http"} in headless[
        "spec"
    ]["ports"]


def test_every_container_has_resources_and_runs_unprivileged():
    for where, doc in _documents():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        for c in pod["containers"]:
            assert c["resources"]["requests"]["memory"], where
            assert c["resources"]["limits"]["memory"], where
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where


# --- compose.scale.yaml -------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _default(value: str) -> str:
    """``${VAR:-default}`` -> ``default``, as compose interpolates it with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_services_and_wiring():
    services = _compose()["services"]
    replicas = sorted(s for s in services if s.startswith("lstm-serve-"))
    assert replicas == ["lstm-serve-1", "lstm-serve-2", "lstm-serve-3"]
    assert set(services) == {"redis", "proxy", *replicas}
    assert services["redis"]["image"] == "redis:7"
    for name in replicas:
        svc = services[name]
        assert svc["build"]["context"] == "..", name
        assert svc["environment"]["LSTM_SERVE_STATE_STORE"] == "redis://redis:6379/0", name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        grace = float(svc["environment"]["LSTM_SERVE_DRAIN_GRACE_S"])
        assert float(svc["stop_grace_period"].removesuffix("s")) > grace, name
    proxy = services["proxy"]
    assert proxy["image"].startswith("nginx:")
    assert set(proxy["depends_on"]) == set(replicas)


def test_compose_publishes_only_the_proxy_and_only_on_loopback():
    services = _compose()["services"]
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert list(published) == ["proxy"]
    for port in published["proxy"]:
        host_ip, host_port, container_port = _default(port).split(":")
        assert host_ip == "127.0.0.1", port
        assert (host_port, container_port) == ("50051", "50051"), port


def test_compose_proxy_config_is_the_render_for_its_replicas():
    services = _compose()["services"]
    mount = next(
        v for v in services["proxy"]["volumes"] if v.split(":")[1] == "/etc/nginx/nginx.conf"
    )
    conf = (COMPOSE.parent / mount.split(":")[0]).resolve()
    assert conf == NGINX / "compose.conf"
    replicas = sorted(s for s in services if s.startswith("lstm-serve-"))
    assert _upstream_servers(conf.read_text(encoding="utf-8")) == [f"{r}:50051" for r in replicas]


# --- nginx --------------------------------------------------------------------------------------


def test_template_routes_on_the_session_header_to_grpc():
    text = (NGINX / "lstm-serve.conf.template").read_text(encoding="utf-8")
    key = re.search(r"^\s*hash\s+(\$\w+)\s+consistent;", text, re.M)
    assert key, "no `hash ... consistent;` in the upstream"
    if key.group(1) != "$http_lstm_session_id":
        # A map may stand between: its default must be the session header.
        var = re.escape(key.group(1))
        m = re.search(rf"map \$http_lstm_session_id {var} \{{(.*?)\}}", text, re.S)
        assert m, f"{key.group(1)} is not derived from $http_lstm_session_id"
        assert re.search(r"default\s+\$http_lstm_session_id;", m.group(1))
    assert re.search(r"^\s*grpc_pass grpc://replicas;", text, re.M)
    nxt = re.search(r"^\s*grpc_next_upstream ([^;]*);", text, re.M)
    assert nxt and "error" in nxt.group(1).split()
    # Resending a POST that a replica may have committed would apply a step twice.
    assert "non_idempotent" not in nxt.group(1)
    assert re.search(r"^\s*grpc_next_upstream_tries [1-9];", text, re.M)


@pytest.mark.parametrize(
    ("path", "make"),
    [
        (NGINX / "compose.conf", lambda: render.compose()),
        (K8S / "nginx.conf", lambda: render.kubernetes()),
    ],
    ids=["compose", "k8s"],
)
def test_committed_nginx_configs_have_not_drifted(path: Path, make: Any):
    use = "compose" if path.parent == NGINX else "k8s"
    assert path.read_text(encoding="utf-8") == make(), (
        f"{path.relative_to(ROOT)} drifted: python deploy/nginx/render.py {use} > "
        f"{path.relative_to(ROOT)}"
    )


def test_render_refuses_what_nginx_would_misread():
    ok = {"prefix": "/tmp/x", "listen": "127.0.0.1:1", "servers": ["127.0.0.1:2"]}
    render.render(**ok)
    for bad in (
        {"prefix": "relative"},
        {"servers": []},
        {"servers": ["127.0.0.1:2", "127.0.0.1:2"]},
        {"prefix": "/tmp/with space"},
        {"servers": ["127.0.0.1:2; evil"]},
    ):
        with pytest.raises(ValueError):
            render.render(**{**ok, **bad})
    with pytest.raises(ValueError, match="left unfilled"):
        render.render(**ok, template="worker_processes 1;\n@NEW_ONE@\n")


def _nginx() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("nginx not found: install the Debian package nginx (apt-get install nginx)")


def _nginx_t(conf: str, prefix: Path) -> subprocess.CompletedProcess[str]:
    path = prefix / "nginx.conf"
    path.write_text(conf, encoding="utf-8")
    return subprocess.run(
        [_nginx(), "-t", "-c", str(path), "-p", str(prefix), "-e", str(prefix / "error.log")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_nginx_accepts_the_rendered_template(tmp_path: Path):
    conf = render.render(
        prefix=str(tmp_path),
        listen="127.0.0.1:50050",
        servers=["127.0.0.1:50061", "127.0.0.1:50062", "127.0.0.1:50063"],
    )
    done = _nginx_t(conf, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
    # The same file with the stderr log the containers use.
    done = _nginx_t(conf.replace(f"error_log {tmp_path}/error.log", "error_log stderr"), tmp_path)
    assert done.returncode == 0, done.stderr


def test_nginx_check_catches_a_broken_config(tmp_path: Path):
    conf = render.render(prefix=str(tmp_path), listen="127.0.0.1:1", servers=["127.0.0.1:2"])
    done = _nginx_t(
        conf.replace("grpc_next_upstream error", "grpc_next_upstream unavailable"), tmp_path
    )
    assert done.returncode != 0
    assert "unavailable" in done.stderr

#!/usr/bin/env bash
# Container test: build the lstm-serve image from the repository's Dockerfile and run it for real.
#
#   scripts/container-test.sh [--keep]      (make container-test)
#
# No Docker engine and no container registry are reachable where this runs, so it uses Debian's
# buildah + podman + runc as root with the vfs storage driver, and makes its own base image:
# `debootstrap --variant=minbase bookworm` (python3, venv, pip, CA certificates) imported with
# `podman import` and passed as BASE_IMAGE. The base tarball is cached outside the repository,
# keyed by the code that builds it; everything else (storage, config, containers, images) lives
# in a temporary folder that is removed at exit.
#
# Checks, in order: the image builds; it holds no torch/onnx and the repository's bundled model
# (in the package and in the repository it serves, /models);
# it runs as a numeric non-root user and declares its health check and stop signal; it turns
# healthy (`podman healthcheck run`);
# greedy `lstm-client generate` against it prints exactly what a local server (host venv, same
# bundled model) prints; KServe v2 over HTTP answers /v2/health/ready and a JSON inference (curl); its metrics port serves the server's metrics; deploy/prometheus.yml
# passes promtool and a real Prometheus scrapes the container with it; on the stop signal it
# drains requests that are in flight (they complete with the full text) and exits 0 within the
# drain grace.
#
# Needs root and apt (it installs buildah podman runc debootstrap when missing; promtool and
# prometheus come from scripts/system-deps.sh, as for make test), the project venv
# (`make install`) and the bundled model server/model_repo/timemachine/1/model.onnx.
# Environment: LSTM_SERVE_CT_CACHE (cache folder, default ~/.cache/lstm-serve-container),
# VENV (default .venv). --keep leaves the temporary folder and the image for debugging.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
CACHE=${LSTM_SERVE_CT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lstm-serve-container}
MODEL=server/model_repo/timemachine/1/model.onnx
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
PROMPT="the time traveller"
SHORT_TOKENS=120     # the equality check
LONG_TOKENS=4000     # requests kept in flight across the stop signal (max_new_tokens is 4096)
IN_FLIGHT=4
HEALTHY_TIMEOUT_S=120
KEEP=0

for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "container-test: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

T_START=$(date +%s.%N)
TIMINGS=()

log() { printf '[container-test %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[container-test] FAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
record() { TIMINGS+=("$1=$2"); log "$1: ${2}s"; }

[ "$(id -u)" -eq 0 ] || die "needs root (buildah/podman with vfs storage and debootstrap run as root)"
[ -x "$VENV/bin/lstm-serve" ] && [ -x "$VENV/bin/lstm-client" ] ||
    die "no lstm-serve/lstm-client in $VENV: run 'make install' first"
[ -f "$ROOT/$MODEL" ] || die "the bundled model $MODEL is missing"
PY=$VENV/bin/python

# --- 1. host tools -----------------------------------------------------------------------------
t=$(now)
missing=()
for tool in buildah podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} with apt"
    apt_log=$(mktemp "${TMPDIR:-/tmp}/lstm-serve-ct-apt.XXXXXX")
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends buildah podman runc debootstrap; } >"$apt_log" 2>&1 ||
        { cat "$apt_log" >&2; rm -f "$apt_log"; die "apt could not install ${missing[*]}"; }
    rm -f "$apt_log"
fi
record tools_s "$(since "$t")"

# --- 2. private container config and storage under a temporary folder ---------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lstm-serve-ct.XXXXXX")
TAG=ct-$(basename "$WORK" | tr -dc 'a-zA-Z0-9' | tr '[:upper:]' '[:lower:]')
BASE_IMAGE=localhost/lstm-serve-base:$TAG
IMAGE=localhost/lstm-serve:$TAG
CTR=lstm-serve-$TAG
# podman/buildah write a blob-info cache under /var/lib/containers even with private storage:
# remove it at exit only if this run created it.
VAR_LIB_CONTAINERS_EXISTED=0
[ -e /var/lib/containers ] && VAR_LIB_CONTAINERS_EXISTED=1
# Every container here uses the host's network, so no bridge, netns or firewall rule is made;
# the cleanup fails the run if one appears anyway (podman's default network would make one).
BRIDGE_EXISTED=0
ip link show cni-podman0 >/dev/null 2>&1 && BRIDGE_EXISTED=1
REF_PID=""
PROM_PID=""
PASSED=0
CLIENT_PIDS=()

cleanup() {
    local rc=$?
    set +e
    for pid in "${CLIENT_PIDS[@]}" $REF_PID $PROM_PID; do
        pkill -TERM -P "$pid" 2>/dev/null
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    if [ "$KEEP" -eq 1 ] && [ -n "${CONTAINERS_CONF:-}" ]; then
        log "--keep: leaving $WORK (export CONTAINERS_CONF=$CONTAINERS_CONF" \
            "CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF to inspect $IMAGE)"
        exit "$rc"
    fi
    local t_clean
    t_clean=$(now)
    if [ -n "${CONTAINERS_CONF:-}" ]; then
        podman rm -f -t 0 "$CTR" >/dev/null 2>&1
        podman rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1
        buildah rm --all >/dev/null 2>&1
    fi
    # vfs makes no mounts, but a killed build can leave its chroot's bind mounts behind.
    findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf "$WORK"
    [ "$VAR_LIB_CONTAINERS_EXISTED" -eq 0 ] && rm -rf /var/lib/containers
    if [ "$BRIDGE_EXISTED" -eq 0 ] && ip link show cni-podman0 >/dev/null 2>&1; then
        log "FAIL: this run created podman's bridge network (cni-podman0): use --network host"
        rc=1
    fi
    if [ "$rc" -eq 0 ] && [ "$PASSED" -eq 1 ]; then
        record cleanup_s "$(since "$t_clean")"
        record wall_s "$(since "$T_START")"
        mkdir -p "$CACHE"
        {
            printf '{"image_bytes": %s, "base_image_bytes": %s' "$image_bytes" "$base_bytes"
            for kv in "${TIMINGS[@]}"; do printf ', "%s": %s' "${kv%%=*}" "${kv#*=}"; done
            printf '}\n'
        } >"$CACHE/last-summary.json"
        log "summary ($CACHE/last-summary.json): $(cat "$CACHE/last-summary.json")"
        log "PASS"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORK/tmp" "$WORK/out"
cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
# runc: crun fails on this host's cgroup layout. The default ulimits ask for more than the host
# grants. File locks and a private tmp_dir keep podman out of /dev/shm and /run.
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=10000:10000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$WORK/events.log"
tmp_dir = "$WORK/tmp"
lock_type = "file"
volume_path = "$WORK/volumes"
[network]
network_config_dir = "$WORK/net"
EOF
printf 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n' >"$WORK/registries.conf"
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
export CONTAINERS_CONF=$WORK/containers.conf
export CONTAINERS_REGISTRIES_CONF=$WORK/registries.conf
export TMPDIR=$WORK/tmp

# --- 3. local base image: debootstrap, cached by the code that builds it ------------------------
debian_mirror() {
    # The archive the host's apt already uses for $SUITE main (one-line and deb822 sources),
    # so no host name is written into the repository.
    "$PY" - "$SUITE" <<'PYEOF'
import glob, re, sys
suite = sys.argv[1]
entries = []  # (uri, suites, components)
files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
for path in files:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(line) >= 4 and line[0] == "deb":
            entries.append((line[1], [line[2]], line[3:]))
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for para in re.split(r"\n\s*\n", open(path, encoding="utf-8").read()):
        fields = {}
        for m in re.finditer(r"^([A-Za-z-]+):[ \t]*(.*)$", para, re.M):
            fields[m.group(1).lower()] = m.group(2).split()
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"])[0] != "no":
            for uri in fields.get("uris", []):
                entries.append((uri, fields.get("suites", []), fields.get("components", [])))
for uri, suites, comps in entries:
    if suite in suites and "main" in comps and uri.startswith(("http://", "https://")):
        print(uri)
        break
else:
    # A host on another release: its Debian archive serves every suite.
    for uri, suites, comps in entries:
        if uri.rstrip("/").endswith("/debian") and "main" in comps:
            print(uri)
            break
PYEOF
}

build_base_rootfs() {
    # $1: target folder, $2: mirror. Everything that decides the base's content is in this
    # function, whose text keys the cache.
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$1" "$2" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap $SUITE from $2 failed"; }
    rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/tmp/*
}

t=$(now)
base_key=$(printf '%s\n%s\n%s\n' "$SUITE" "$BASE_PACKAGES" "$(declare -f build_base_rootfs)" |
    sha256sum | cut -c1-16)
base_tar=$CACHE/base-$SUITE-$base_key.tar
if [ -f "$base_tar" ]; then
    log "base: cached $base_tar"
else
    mirror=$(debian_mirror)
    [ -n "$mirror" ] || die "no Debian archive for $SUITE main found in the host's apt sources"
    log "base: debootstrap --variant=minbase $SUITE from the host's mirror (about a minute)"
    build_base_rootfs "$WORK/rootfs" "$mirror"
    mkdir -p "$CACHE"
    rm -f "$CACHE"/base-"$SUITE"-*.tar  # older recipes
    # The runtime provides /dev; device nodes in a layer are only trouble.
    tar --numeric-owner -C "$WORK/rootfs" --exclude='./dev/*' -cf "$base_tar.part" .
    mv "$base_tar.part" "$base_tar"
    rm -rf "$WORK/rootfs"
fi
record base_s "$(since "$t")"
t=$(now)
podman import --quiet "$base_tar" "$BASE_IMAGE" >/dev/null
record import_s "$(since "$t")"

# --- 4. the image -------------------------------------------------------------------------------
ca_bundle=""
for f in "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    [ -n "$f" ] && [ -f "$f" ] && { ca_bundle=$f; break; }
done
secret_args=()
# The host's bundle (it trusts the HTTPS proxy) is lent to pip as a build secret, never copied.
[ -n "$ca_bundle" ] && secret_args=(--secret "id=ca_bundle,src=$ca_bundle")
log "build: buildah build (log: $WORK/build.log)"
t=$(now)
if ! buildah build --isolation chroot --format docker --network host --storage-driver vfs \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" "${secret_args[@]}" \
    -f "$ROOT/Dockerfile" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log" >&2
    die "buildah build failed"
fi
record build_s "$(since "$t")"
image_bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_bytes=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
log "image: $((image_bytes / 1000000)) MB (local base $((base_bytes / 1000000)) MB)"

# What the image declares (healthcheck and stop signal survive only in docker format).
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
stop_signal=$(podman image inspect --format '{{.Config.StopSignal}}' "$IMAGE")
health=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
[[ "$user" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] || die "image user '$user' is not a numeric non-root uid"
[ -n "$stop_signal" ] || die "image declares no STOPSIGNAL"
[[ "$health" == *lstm-client* ]] || die "image has no lstm-client HEALTHCHECK (got: $health)"
# The drain is tested with the grace the image ships with.
GRACE_S=$(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" |
    sed -n 's/^LSTM_SERVE_DRAIN_GRACE_S=//p')
[[ "$GRACE_S" =~ ^[0-9]+$ ]] || die "image sets no whole-second LSTM_SERVE_DRAIN_GRACE_S (got '$GRACE_S')"
model_sha=$(sha256sum "$ROOT/$MODEL" | cut -d' ' -f1)
podman run --rm --network host --entrypoint python "$IMAGE" -c '
import hashlib, importlib.util as u, pathlib, sys
bad = [m for m in ("torch", "onnx") if u.find_spec(m)]
if bad:
    sys.exit(f"the runtime venv holds {bad}")
import server
for model in (pathlib.Path(server.__file__).parent / "model_repo/timemachine/1/model.onnx",
              pathlib.Path("/models/timemachine/1/model.onnx")):
    if not model.is_file() or hashlib.sha256(model.read_bytes()).hexdigest() != sys.argv[1]:
        sys.exit(f"the bundled model in the image ({model}) is not the repository'"'"'s")' \
    "$model_sha" >"$WORK/contents.log" 2>&1 ||
    { grep -v systemd "$WORK/contents.log" >&2; die "the image's contents are wrong (above)"; }

# --- 5. reference: the same requests against a local server on the same bundled model -----------
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
wait_healthy_local() { # $1 target, $2 pid
    local deadline=$((SECONDS + 60))
    until "$VENV/bin/lstm-client" health --target "$1" >/dev/null 2>&1; do
        kill -0 "$2" 2>/dev/null || die "the local reference server exited early"
        [ "$SECONDS" -lt "$deadline" ] || die "the local reference server never became healthy"
        sleep 0.2
    done
}
generate() { # $1 target, $2 max tokens
    "$VENV/bin/lstm-client" generate --target "$1" --prompt "$PROMPT" --max-tokens "$2" \
        --temperature 0
}

ref_port=$(free_port)
ref_metrics=$(free_port)
LSTM_SERVE_HOST=127.0.0.1 LSTM_SERVE_PORT=$ref_port LSTM_SERVE_METRICS_PORT=$ref_metrics \
    LSTM_SERVE_MODEL="$ROOT/$MODEL" LSTM_SERVE_PROVIDER=cpu \
    "$VENV/bin/lstm-serve" >"$WORK/reference.log" 2>&1 &
REF_PID=$!
wait_healthy_local "127.0.0.1:$ref_port" "$REF_PID"
generate "127.0.0.1:$ref_port" "$SHORT_TOKENS" >"$WORK/out/ref-short.txt" ||
    die "generate against the local server failed"
generate "127.0.0.1:$ref_port" "$LONG_TOKENS" >"$WORK/out/ref-long.txt" ||
    die "long generate against the local server failed"
kill -TERM "$REF_PID"
wait "$REF_PID" || die "the local reference server did not exit 0 on SIGTERM"
REF_PID=""
[ -s "$WORK/out/ref-short.txt" ] || die "the local server generated nothing"

# --- 6. the container: start, healthy ------------------------------------------------------------
port=$(free_port)
metrics_port=$(free_port)
http_port=$(free_port)
log "run: $IMAGE on gRPC :$port, metrics :$metrics_port, HTTP :$http_port"
t=$(now)
# podman 4 logs that it cannot reach systemd to schedule health checks; they run by hand here.
# The same hardening as deploy/compose.yaml: read-only root, tmpfs /tmp, no capabilities.
podman run -d --name "$CTR" --network host \
    --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
    -e "LSTM_SERVE_PORT=$port" -e "LSTM_SERVE_METRICS_PORT=$metrics_port" \
    -e "LSTM_SERVE_HTTP_PORT=$http_port" \
    "$IMAGE" >/dev/null 2>>"$WORK/podman.log" || { cat "$WORK/podman.log" >&2; die "podman run failed"; }
# With vfs, `podman run` copies the whole image into the container's layer first: most of the
# start time here, and not what a user with overlay storage sees. Report both parts.
record podman_run_s "$(since "$t")"
t_run=$(now)
deadline=$((SECONDS + HEALTHY_TIMEOUT_S))
until podman healthcheck run "$CTR" >/dev/null 2>>"$WORK/podman.log"; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$CTR")" != true ]; then
        podman logs "$CTR" 2>&1 | tail -30 >&2
        die "the container exited before it was healthy"
    fi
    [ "$SECONDS" -lt "$deadline" ] || { podman logs "$CTR" 2>&1 | tail -30 >&2; die "not healthy after ${HEALTHY_TIMEOUT_S}s"; }
    sleep 0.5
done
record run_to_healthy_s "$(since "$t_run")"
record start_to_healthy_s "$(since "$t")"

# --- 7. same text as the local server ------------------------------------------------------------
generate "127.0.0.1:$port" "$SHORT_TOKENS" >"$WORK/out/ctr-short.txt" ||
    die "generate against the container failed"
cmp -s "$WORK/out/ref-short.txt" "$WORK/out/ctr-short.txt" || {
    diff <(fold -w 100 "$WORK/out/ref-short.txt") <(fold -w 100 "$WORK/out/ctr-short.txt") >&2
    die "the container's greedy text differs from the local server's"
}
log "generate: container text == local text ($(wc -c <"$WORK/out/ctr-short.txt") bytes)"
# KServe v2 over HTTP/REST (the image turns it on): what Kubernetes' httpGet probes ask, and one
# plain-JSON inference.
ready=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/v2/health/ready") ||
    die "curl could not reach the container's HTTP port $http_port"
[ "$ready" = 200 ] || die "/v2/health/ready answered $ready, not 200"
curl -sf "http://127.0.0.1:$http_port/v2/models/timemachine/infer" \
    -H 'Content-Type: application/json' \
    -d '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["the time"]}]}' \
    >"$WORK/out/http-infer.json" || die "HTTP inference against the container failed"
"$PY" -c 'import json, sys; (o,) = json.load(open(sys.argv[1]))["outputs"]; assert o["name"] == "logits" and len(o["data"]) == 28, o' \
    "$WORK/out/http-infer.json" || die "HTTP inference answered $(head -c 300 "$WORK/out/http-infer.json")"
log "http: /v2/health/ready 200, /v2/models/timemachine/infer gives 28 logits"
# No GPU here: the server must say it serves from the CPU, without ONNX Runtime's CUDA error spam.
podman logs "$CTR" >"$WORK/out/container-start.log" 2>&1
grep -q '/models/timemachine/1/model.onnx' "$WORK/out/container-start.log" ||
    { cat "$WORK/out/container-start.log" >&2; die "the container does not serve its repository /models"; }
grep -q 'provider CPUExecutionProvider' "$WORK/out/container-start.log" ||
    { cat "$WORK/out/container-start.log" >&2; die "the container's log does not name the CPU provider"; }
if grep -E '\[E:onnxruntime|Traceback' "$WORK/out/container-start.log" >&2; then
    die "the container's log holds errors (above)"
fi

# LSTM_SERVE_HOST=0.0.0.0: the server must answer on a non-loopback address too.
host_ip=$(ip -4 -o addr show scope global 2>/dev/null | awk '{ split($4, a, "/"); print a[1]; exit }')
if [ -n "$host_ip" ]; then
    "$VENV/bin/lstm-client" health --timeout 5 --target "$host_ip:$port" >/dev/null ||
        die "the container does not answer on $host_ip:$port (not bound to 0.0.0.0?)"
    "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5).read()' \
        "http://$host_ip:$metrics_port/metrics" ||
        die "the container's metrics do not answer on $host_ip:$metrics_port"
    log "bind: gRPC and metrics answer on $host_ip (0.0.0.0 inside the container)"
else
    log "bind: no non-loopback IPv4 address here; 0.0.0.0 not checked"
fi

# --- 8. metrics ----------------------------------------------------------------------------------
# The engine's counters reach the metrics port with the front end's next heartbeat (0.5 s): poll
# until the Generate just served is counted, rather than scraping once and racing it.
"$PY" - "$metrics_port" "$SHORT_TOKENS" "$WORK/out/metrics.txt" <<'PYEOF' || die "the container's metrics are not what the server exports"
import sys, time, urllib.request
from prometheus_client.parser import text_string_to_metric_families

port, want_tokens, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def scrape():
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200, r.status
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples

def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)

# One health check and one greedy Generate have been served; the model runs on the CPU here.
deadline = time.monotonic() + 15  # 30 heartbeats
scrapes = 0
while True:
    text, samples = scrape()
    scrapes += 1
    generated = value(samples, "lstm_serve_requests_total", method="Generate", code="OK")
    decoded = sum(  # over the loaded model versions
        v for (n, labels), v in samples.items()
        if n == "lstm_serve_tokens_processed_total" and ("phase", "decode") in labels
    )
    if (generated >= 1 and decoded >= want_tokens - 1) or time.monotonic() > deadline:
        break
    time.sleep(0.25)
open(out, "w").write(text)
assert generated >= 1, f"Generate not counted after {scrapes} scrapes over 15 s"
assert decoded >= want_tokens - 1, f"decode tokens {decoded} < the {want_tokens} generated"
info = [k for k in samples if k[0] == "lstm_serve_model_info"]
assert info and ("provider", "CPUExecutionProvider") in info[0][1], info
print(f"metrics: {len({k[0] for k in samples})} series names, Generate OK counted "
      f"(scrape {scrapes}), {decoded:.0f} decode tokens, provider CPUExecutionProvider",
      file=sys.stderr)
PYEOF

# --- 9. Prometheus with deploy/prometheus.yml scrapes the container ------------------------------
# Debian's prometheus package, unpacked (never installed, so no service starts) by the same
# script that `make test` runs.
t=$(now)
bash "$ROOT/scripts/system-deps.sh" >"$WORK/system-deps.log" 2>&1 ||
    { cat "$WORK/system-deps.log" >&2; die "scripts/system-deps.sh could not provide prometheus"; }
prom_dir=${LSTM_SERVE_PROMETHEUS_DIR:-$ROOT/.cache/prometheus}
"$prom_dir/usr/bin/promtool" check config "$ROOT/deploy/prometheus.yml" >"$WORK/promtool.log" 2>&1 ||
    { cat "$WORK/promtool.log" >&2; die "promtool rejects deploy/prometheus.yml"; }
# Only the target changes: compose's service name becomes this container's metrics port.
grep -q '"lstm-serve:9090"' "$ROOT/deploy/prometheus.yml" ||
    die "deploy/prometheus.yml no longer targets lstm-serve:9090"
sed "s/\"lstm-serve:9090\"/\"127.0.0.1:$metrics_port\"/" "$ROOT/deploy/prometheus.yml" >"$WORK/prometheus.yml"
# The rule files prometheus.yml names (prometheus/*.rules.yml) are relative to it: copy them too.
cp -r "$ROOT/deploy/prometheus" "$WORK/prometheus"
prom_port=$(free_port)
"$prom_dir/usr/bin/prometheus" --config.file="$WORK/prometheus.yml" \
    --storage.tsdb.path="$WORK/prometheus-data" --web.listen-address="127.0.0.1:$prom_port" \
    >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
"$PY" - "$prom_port" <<'PYEOF' || { tail -20 "$WORK/prometheus.log" >&2; die "Prometheus did not scrape the container"; }
import json, sys, time, urllib.parse, urllib.request

def query(q):
    url = f"http://127.0.0.1:{sys.argv[1]}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]

deadline = time.monotonic() + 40  # startup plus at most one 5 s scrape interval, with slack
while True:
    try:
        up = query('up{job="lstm-serve"}')
        if up and up[0]["value"][1] == "1":
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("up{job=lstm-serve} never became 1")
    time.sleep(0.5)
series = query('count({__name__=~"lstm_serve_.+", job="lstm-serve"})')
assert series and float(series[0]["value"][1]) > 0, "no lstm_serve_ series in Prometheus"
print(f"Prometheus: up=1, {series[0]['value'][1]} lstm_serve_ series", file=sys.stderr)
PYEOF
kill "$PROM_PID"
wait "$PROM_PID" 2>/dev/null || true
PROM_PID=""
record prometheus_s "$(since "$t")"

# --- 10. stop signal: drain in-flight requests, exit 0 within the grace --------------------------
for i in $(seq 1 "$IN_FLIGHT"); do
    (
        rc=0
        generate "127.0.0.1:$port" "$LONG_TOKENS" >"$WORK/out/drain-$i.txt" 2>"$WORK/out/drain-$i.err" || rc=$?
        printf '%s %s\n' "$rc" "$(now)" >"$WORK/out/drain-$i.done"
    ) &
    CLIENT_PIDS+=($!)
done
# Signal once every request has streamed something, so all of them are in flight.
deadline=$((SECONDS + 30))
for i in $(seq 1 "$IN_FLIGHT"); do
    until [ -s "$WORK/out/drain-$i.txt" ] || [ -e "$WORK/out/drain-$i.done" ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "in-flight generate $i streamed nothing in 30s"
        sleep 0.02
    done
done
t_signal=$(now)
podman kill --signal "$stop_signal" "$CTR" >/dev/null
exit_code=$(timeout $((GRACE_S + 15)) podman wait "$CTR" 2>>"$WORK/podman.log") ||
    die "the container did not exit within $((GRACE_S + 15))s of $stop_signal"
drain_s=$(since "$t_signal")
for pid in "${CLIENT_PIDS[@]}"; do wait "$pid" || true; done
CLIENT_PIDS=()
podman logs "$CTR" >"$WORK/out/container.log" 2>&1 || true
[ "$exit_code" -eq 0 ] || { tail -30 "$WORK/out/container.log" >&2; die "the container exited $exit_code on $stop_signal, not 0"; }
awk -v d="$drain_s" -v g="$GRACE_S" 'BEGIN { exit !(d <= g + 5) }' ||
    die "drain took ${drain_s}s, more than the ${GRACE_S}s grace"
in_flight_at_signal=0
for i in $(seq 1 "$IN_FLIGHT"); do
    read -r rc t_done <"$WORK/out/drain-$i.done"
    [ "$rc" -eq 0 ] || { cat "$WORK/out/drain-$i.err" >&2; die "in-flight generate $i failed during the drain (exit $rc)"; }
    cmp -s "$WORK/out/ref-long.txt" "$WORK/out/drain-$i.txt" ||
        die "in-flight generate $i did not complete with the full text during the drain"
    awk -v a="$t_done" -v b="$t_signal" 'BEGIN { exit !(a > b) }' && in_flight_at_signal=$((in_flight_at_signal + 1))
done
[ "$in_flight_at_signal" -gt 0 ] ||
    die "every generate finished before the signal: nothing was in flight (raise LONG_TOKENS)"
record drain_s "$drain_s"
log "drain: exit 0 after ${drain_s}s; $in_flight_at_signal/$IN_FLIGHT requests in flight at $stop_signal all completed"

PASSED=1  # the summary and PASS are printed once cleanup is done

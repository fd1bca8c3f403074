"""Fill in ``lstm-serve.conf.template``: nginx as the session-affine gRPC proxy (issue 12).

Three uses, one template::

    # a scale test: nginx unprivileged from a temporary folder, in front of local replicas
    python deploy/nginx/render.py scale --prefix /tmp/px --listen 127.0.0.1:50050 \\
        --replica 127.0.0.1:50061 --replica 127.0.0.1:50062 > /tmp/px/nginx.conf
    nginx -c /tmp/px/nginx.conf -p /tmp/px -e /tmp/px/error.log

    # the committed copies (tests/unit/test_deploy_manifests.py fails when they drift)
    python deploy/nginx/render.py compose > deploy/nginx/compose.conf
    python deploy/nginx/render.py k8s > deploy/k8s/nginx.conf

From Python, load this file by path and call :func:`render` (or :func:`compose` /
:func:`kubernetes`). Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

TEMPLATE = Path(__file__).with_name("lstm-serve.conf.template")
PLACEHOLDERS = ("PREFIX", "ERROR_LOG", "LISTEN", "RESOLVER", "SERVERS")

# After one failed connect a replica is skipped for this long, then tried again by one request.
SERVER_PARAMS = "max_fails=1 fail_timeout=10s"

# Docker's embedded DNS; kube-dns is the Service name CoreDNS keeps in Kubernetes. valid=5s: how
# soon nginx sees a replica that came, went or moved to another address.
COMPOSE_RESOLVER = "resolver 127.0.0.11 valid=5s ipv6=off;"
K8S_RESOLVER = "resolver kube-dns.kube-system.svc.cluster.local valid=5s ipv6=off;"

GENERATED = (
    "# Made from deploy/nginx/lstm-serve.conf.template by deploy/nginx/render.py: edit those and\n"
    "# render again rather than this file.\n"
)

_TOKEN = re.compile(r"[A-Za-z0-9_.:/\[\]-]+")


def render(
    *,
    prefix: str,
    listen: str,
    servers: Sequence[str],
    error_log: str | None = None,
    resolver: str = "",
    template: str | None = None,
) -> str:
    """The template with every placeholder filled.

    ``servers`` are ``HOST:PORT`` addresses, one per replica, all different; with a
    ``resolver`` line each gets ``resolve`` (nginx >= 1.27.3 re-resolves it while running).
    ``error_log`` defaults to ``PREFIX/error.log``. Raises ValueError for a relative prefix, no
    or repeated servers, a value that is not a single nginx token, or a placeholder left over.
    """
    if not prefix.startswith("/"):
        raise ValueError(f"prefix must be an absolute path, got {prefix!r}")
    if not servers:
        raise ValueError("at least one replica address is needed")
    if len(set(servers)) != len(servers):
        raise ValueError(f"replica addresses repeat: {list(servers)}")
    prefix = prefix.rstrip("/") or "/"
    log = error_log if error_log is not None else f"{prefix.rstrip('/')}/error.log"
    checks = [("prefix", prefix), ("listen", listen), ("error_log", log)]
    for name, value in checks + [("replica", s) for s in servers]:
        if not _TOKEN.fullmatch(value):
            raise ValueError(f"{name} {value!r} is not a single nginx token")
    resolve = " resolve" if resolver else ""
    lines = "\n".join(f"        server {s}{resolve} {SERVER_PARAMS};" for s in servers)
    text = template if template is not None else TEMPLATE.read_text(encoding="utf-8")
    values = {
        "PREFIX": prefix.rstrip("/"),
        "ERROR_LOG": log,
        "LISTEN": listen,
        "RESOLVER": resolver,
        "SERVERS": lines,
    }
    # The template's header comment explains the placeholders; the output says where it came
    # from instead.
    first = re.search(r"^[^#\s]", text, re.M)
    body = "\n" + text[first.start() :] if first else ""
    for name in PLACEHOLDERS:
        body = body.replace(f"@{name}@", values[name])
    left = re.findall(r"@[A-Z_]+@", body)
    if left:
        raise ValueError(f"placeholders left unfilled: {sorted(set(left))}")
    out = GENERATED + body
    return "\n".join(line.rstrip() for line in out.splitlines()) + "\n"


def compose(replicas: int = 3) -> str:
    """The copy compose.scale.yaml mounts: the nginx:1.27 image, replicas lstm-serve-1..N."""
    return render(
        prefix="/tmp",
        error_log="stderr",
        listen="50051",
        servers=[f"lstm-serve-{i}:50051" for i in range(1, replicas + 1)],
        resolver=COMPOSE_RESOLVER,
    )


def kubernetes(replicas: int = 3, namespace: str = "lstm-serve") -> str:
    """The copy deploy/k8s/ puts in the proxy's ConfigMap: the StatefulSet's pods by their stable
    DNS names under the headless Service ``lstm-serve-pods`` (FQDNs: nginx's own resolver does
    not use the search domains of /etc/resolv.conf)."""
    return render(
        prefix="/tmp",
        error_log="stderr",
        listen="50051",
        servers=[
            f"lstm-serve-{i}.lstm-serve-pods.{namespace}.svc.cluster.local:50051"
            for i in range(replicas)
        ],
        resolver=K8S_RESOLVER,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="use", required=True)
    scale = sub.add_parser("scale", help="local replicas, nginx unprivileged from --prefix")
    scale.add_argument("--prefix", required=True, help="absolute, writable folder")
    scale.add_argument("--listen", required=True, help="[address:]port of the proxy")
    scale.add_argument("--replica", action="append", required=True, help="HOST:PORT, repeat")
    scale.add_argument("--error-log", default=None, help="default: PREFIX/error.log")
    for name in ("compose", "k8s"):
        p = sub.add_parser(name, help=f"the committed {name} copy")
        p.add_argument("--replicas", type=int, default=3)
    sub.choices["k8s"].add_argument("--namespace", default="lstm-serve")
    args = parser.parse_args(argv)
    try:
        if args.use == "scale":
            text = render(
                prefix=args.prefix,
                listen=args.listen,
                servers=args.replica,
                error_log=args.error_log,
            )
        elif args.use == "compose":
            text = compose(args.replicas)
        else:
            text = kubernetes(args.replicas, args.namespace)
    except ValueError as e:
        parser.error(str(e))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

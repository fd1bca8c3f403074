#!/usr/bin/env bash
# The Debian packages the test suite and the scale-out test run for real: redis-server (the state
# store tests start their own on free loopback ports) and nginx (the deployment tests check its
# configuration; the scale test proxies through it). Shared by `make test` and `.ci/run`.
# And Debian's prometheus package, unpacked (never installed: installing starts a service on port
# 9090) into .cache/prometheus/ in the repository (git-ignored; LSTM_SERVE_PROMETHEUS_DIR moves
# it), which gives `make monitoring-check` its promtool and tests/integration/test_monitoring.py
# its prometheus: .cache/prometheus/usr/bin/{promtool,prometheus}. `apt-get download` and
# `dpkg-deb -x` need no root; only a machine without package lists needs root for apt-get update.
#
#   scripts/system-deps.sh            install what is missing (apt-get as root), or say how
#   scripts/system-deps.sh --check    only say what is missing (exit 1 if anything is)
#
# The packages' own services are not used: every test starts its own instances on free ports.
set -euo pipefail

CHECK=0
case "${1:-}" in
    --check) CHECK=1 ;;
    "") ;;
    *) echo "system-deps: unknown argument '$1' (try --check)" >&2; exit 2 ;;
esac

# package -> a program it installs (nginx lives in /usr/sbin, which a non-root PATH may lack)
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
missing=()
have redis-server || missing+=(redis-server)
have nginx || missing+=(nginx)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROM_DIR=${LSTM_SERVE_PROMETHEUS_DIR:-$ROOT/.cache/prometheus}
prometheus_unpacked() { [ -x "$PROM_DIR/usr/bin/promtool" ] && [ -x "$PROM_DIR/usr/bin/prometheus" ]; }
unpack_prometheus() {
    local tmp rc=0
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/lstm-serve-prometheus.XXXXXX")
    # A fresh machine may have no package lists yet: update (root) only when the first try fails.
    (cd "$tmp" && apt-get download -q prometheus) >"$tmp/apt.log" 2>&1 ||
        { [ "$(id -u)" -eq 0 ] && apt-get update -q >>"$tmp/apt.log" 2>&1 &&
            (cd "$tmp" && apt-get download -q prometheus) >>"$tmp/apt.log" 2>&1; } || rc=1
    if [ "$rc" -eq 0 ]; then
        rm -rf "$PROM_DIR.part"
        mkdir -p "$(dirname "$PROM_DIR")"
        dpkg-deb -x "$tmp"/prometheus_*.deb "$PROM_DIR.part" && rm -rf "$PROM_DIR" &&
            mv "$PROM_DIR.part" "$PROM_DIR" || rc=1
    fi
    [ "$rc" -eq 0 ] || cat "$tmp/apt.log" >&2
    rm -rf "$tmp"
    return "$rc"
}
prom_cmd="mkdir -p /tmp/p && (cd /tmp/p && apt-get download prometheus) && dpkg-deb -x /tmp/p/prometheus_*.deb $PROM_DIR"
if ! prometheus_unpacked; then
    if [ "$CHECK" -eq 1 ]; then
        echo "system-deps: no promtool/prometheus in $PROM_DIR (unpack Debian's package: $prom_cmd)" >&2
    elif ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
        echo "system-deps: the tests need promtool and prometheus from Debian's prometheus package" \
            "unpacked in $PROM_DIR (no apt-get/dpkg-deb here: put a Prometheus release's" \
            "promtool and prometheus in $PROM_DIR/usr/bin)" >&2
        exit 1
    else
        echo "system-deps: unpacking Debian's prometheus package into $PROM_DIR" >&2
        unpack_prometheus && prometheus_unpacked || {
            echo "system-deps: could not unpack prometheus; as root, run:" >&2
            echo "    sudo apt-get update && $prom_cmd" >&2
            exit 1
        }
    fi
fi

if [ "${#missing[@]}" -eq 0 ]; then
    [ "$CHECK" -eq 1 ] && ! prometheus_unpacked && exit 1
    exit 0
fi

cmd="apt-get install -y ${missing[*]}"
if [ "$CHECK" -eq 1 ]; then
    echo "system-deps: missing Debian package(s): ${missing[*]} (install with: sudo $cmd)" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "system-deps: the tests need the Debian package(s) ${missing[*]}; as root, run:" >&2
        echo "    sudo $cmd" >&2
    else
        echo "system-deps: the tests need ${missing[*]} (Debian packages; no apt-get here:" \
            "install them with this system's package manager)" >&2
    fi
    exit 1
fi
echo "system-deps: installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
# A fresh machine may have no package lists yet: update only when the first try fails.
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}"; }
for p in "${missing[@]}"; do
    have "$p" || { echo "system-deps: $p did not install" >&2; exit 1; }
done

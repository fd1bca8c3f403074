#!/usr/bin/env bash
# The Debian packages the test suite and the scale-out test run for real: redis-server (the state
# store tests start their own on free loopback ports) and nginx (the deployment tests check its
# configuration; the scale test proxies through it). Shared by `make test` and `.ci/run`.
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
[ "${#missing[@]}" -eq 0 ] && exit 0

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

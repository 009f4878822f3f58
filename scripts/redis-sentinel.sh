#!/usr/bin/env bash
# Makes sure `redis-sentinel` (and `redis-server`, `redis-cli`) are on PATH, for the
# Redis Sentinel end-to-end test (scripts/e2e_backendai_sentinel.py, `make redis-sentinel`).
#
#   scripts/redis-sentinel.sh
#       Nothing to do when `redis-sentinel` runs; otherwise installs the Debian
#       packages redis-sentinel and redis-tools with apt-get (as root, or through
#       sudo), without starting the package's own service. Prints the binary's path.
#       Fails, saying why, when it cannot install them.
set -euo pipefail

die() {
    echo "redis-sentinel.sh: $*" >&2
    exit 1
}

present() {
    command -v redis-sentinel >/dev/null 2>&1 && redis-sentinel --version >/dev/null 2>&1 &&
        command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1
}

if present; then
    command -v redis-sentinel
    exit 0
fi

command -v apt-get >/dev/null 2>&1 ||
    die "redis-sentinel is not installed and this machine has no apt-get: install Redis Sentinel (redis-sentinel on PATH) by hand"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null ||
        die "redis-sentinel is not installed and installing it needs root (no password-less sudo)"
    sudo=(sudo -n)
fi

echo "== installing redis-sentinel (Debian package)" >&2
# The package's service must not start: the test runs sentinels of its own.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod +x "$policy"
    created_policy=1
fi
cleanup() {
    if [[ $created_policy -eq 1 ]]; then "${sudo[@]}" rm -f "$policy"; fi
}
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get install -y --no-install-recommends redis-sentinel redis-tools >&2; then
    "${sudo[@]}" apt-get update >&2 || die "apt-get update failed"
    "${sudo[@]}" apt-get install -y --no-install-recommends redis-sentinel redis-tools >&2 ||
        die "apt-get could not install redis-sentinel"
fi
present || die "redis-sentinel was installed but does not run"
command -v redis-sentinel

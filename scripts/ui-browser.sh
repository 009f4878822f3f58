#!/usr/bin/env bash
# The headless browser for `make e2e-ui`: Debian's chromium and chromium-driver
# (installed with apt-get when missing, which needs root) and a venv with Python
# selenium outside the repository.
#
#   scripts/ui-browser.sh venv
#       Installs what is missing and prints the venv's path:
#       ${UI_BROWSER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/appproxy-coordinator/ui-selenium-VERSION}
#       The marker file .installed-selenium==VERSION is written last, so an
#       interrupted build is redone. Exits 3 (after saying why) when chromium
#       cannot be installed here (no apt-get, not root): the caller skips.
set -euo pipefail

SELENIUM=4.27.1
VENV=${UI_BROWSER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/appproxy-coordinator/ui-selenium-$SELENIUM}
MARKER="$VENV/.installed-selenium==$SELENIUM"

die() {
    echo "ui-browser.sh: $1" >&2
    exit "${2:-1}"
}

browser() {
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "chromium is missing and there is no apt-get to install it" 3
    [ "$(id -u)" = 0 ] || die "chromium is missing and installing it needs root (apt-get)" 3
    echo "ui-browser.sh: installing chromium and chromium-driver (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends chromium chromium-driver >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends chromium chromium-driver >&2; } ||
        die "apt-get could not install chromium chromium-driver" 3
}

python() {
    if [ -n "${UI_PYTHON:-}" ]; then echo "$UI_PYTHON"; return; fi
    for p in python3.13 ~/.pyenv/versions/3.13*/bin/python3 python3; do
        if "$p" -c 'import venv' >/dev/null 2>&1; then echo "$p"; return; fi
    done
    die "no python3"
}

venv() {
    browser
    if [ ! -e "$MARKER" ]; then
        rm -rf "$VENV"
        "$(python)" -m venv "$VENV" >&2
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "selenium==$SELENIUM" >&2
        touch "$MARKER"
    fi
    echo "$VENV"
}

case "${1:-}" in
    venv) venv ;;
    *) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The unmodified Backend.AI App Proxy worker (PyPI backend-ai-appproxy-worker,
# pinned below) for end-to-end tests of this coordinator (`make e2e-backendai`, CI).
#
#   scripts/backendai-worker.sh venv
#       Builds (once) a venv outside the repository and prints its path:
#       ${BACKENDAI_WORKER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/appproxy-coordinator/backendai-26.9.6}
#       Needs Python 3.13 (the package requires >=3.13,<3.14): $BACKENDAI_PYTHON,
#       else python3.13 on PATH, else ~/.pyenv/versions/3.13*/bin/python3, else
#       python3 if it is 3.13. Only PyPI is contacted, and only when the venv is not
#       complete (the marker file .installed-backend-ai-appproxy-worker==VERSION is
#       written last, so an interrupted build is redone).
#
#   scripts/backendai-worker.sh python
#       Prints the Python 3.13 the venvs are built from (the same search as `venv`);
#       scripts/backendai-upstream-schema.sh uses it too.
#
#   scripts/backendai-worker.sh config OUT.toml [options]
#       Writes a worker config (TOML). Options (defaults in brackets):
#         --coordinator URL       coordinator base URL [http://127.0.0.1:10200]
#         --authority NAME        worker authority, its unique name [worker-e2e]
#         --api-host HOST         bind host of the worker API (/setup) [127.0.0.1]
#         --api-port PORT         worker API port [10201]
#         --advertised-host HOST  host the coordinator hands out (worker `hostname`,
#                                 port-proxy advertised_host) [the bind host]
#         --port-range LO-HI      port frontend with this range [10205-10300]
#         --wildcard-domain .DOM  wildcard (subdomain) frontend instead of ports
#         --wildcard-port PORT    wildcard frontend listen port [10250]
#         --protocol P            http | tcp [http]
#         --traffics LIST         interactive,inference [interactive,inference]
#         --redis URL             redis://[:PASSWORD@]HOST[:PORT][/DB] [redis://127.0.0.1:6379]
#                                 (the DB number is ignored: the worker picks its own DBs)
#         --redis-sentinel LIST   HOST:PORT,... of Redis Sentinels: [redis] sentinel (the
#                                 host of --redis is then not used, its password is) []
#         --redis-service-name N  [redis] service_name, with --redis-sentinel []
#         --api-secret S          [secrets] api_secret, sent as X-BackendAI-Token [some_api_secret]
#         --jwt-secret S          [secrets] jwt_secret (setup/inference JWTs) [some_jwt_secret]
#         --permit-secret S       [permit_hash] secret (interactive cookie) [some_permit_hash_secret]
#         --heartbeat SECONDS     PATCH /api/worker/{id} period [10.0]
#         --aiomonitor-port P     aiomonitor termui port; webui = P+1000 [48600]
#         --ipc-dir DIR           IPC sockets [/tmp/backend.ai/ipc]
#         --log-level L           INFO | DEBUG | ... [INFO]
#       Every option can also come from the environment: BACKENDAI_WORKER_<NAME>,
#       NAME upper-cased with `-` as `_` (e.g. BACKENDAI_WORKER_API_SECRET).
#
#   scripts/backendai-worker.sh run CONFIG.toml [worker options, e.g. --debug]
#       Builds the venv if needed, then execs the worker in the foreground
#       (`backend.ai app-proxy-worker start-server -f CONFIG`, the upstream entry
#       point). SIGINT/SIGTERM stop it; on the way out it sends
#       DELETE /api/worker/{id}. Prometheus multiprocess files go to
#       $BACKENDAI_PROMETHEUS_DIR [a `prometheus` folder next to CONFIG], not ./run.
set -euo pipefail

VERSION=26.9.6
PKG="backend-ai-appproxy-worker==$VERSION"
VENV=${BACKENDAI_WORKER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/appproxy-coordinator/backendai-$VERSION}
MARKER="$VENV/.installed-$PKG"

die() {
    echo "backendai-worker.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

# A Python that really runs and is 3.13.x. A pyenv shim for python3.13 can be on
# PATH without being runnable, so each candidate is executed, not just looked up.
find_python() {
    local c check='import sys, venv, ensurepip; sys.exit(0 if sys.version_info[:2] == (3, 13) else 1)'
    local -a cands=()
    if [[ -n "${BACKENDAI_PYTHON:-}" ]]; then
        # An explicit choice is used or refused, never silently replaced.
        "$BACKENDAI_PYTHON" -c "$check" >/dev/null 2>&1 ||
            die "BACKENDAI_PYTHON=$BACKENDAI_PYTHON is not a working Python 3.13 with venv"
        echo "$BACKENDAI_PYTHON"
        return 0
    fi
    if command -v python3.13 >/dev/null 2>&1; then
        cands+=("$(command -v python3.13)")
    fi
    for c in "$HOME"/.pyenv/versions/3.13*/bin/python3 /usr/local/bin/python3.13 /usr/bin/python3.13; do
        if [[ -x "$c" ]]; then
            cands+=("$c")
        fi
    done
    if command -v python3 >/dev/null 2>&1; then
        cands+=("$(command -v python3)")
    fi
    for c in "${cands[@]}"; do
        if "$c" -c "$check" >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
    done
    die "no working Python 3.13 found (tried: ${cands[*]:-nothing}); set BACKENDAI_PYTHON"
}

cmd_venv() {
    if [[ -f "$MARKER" && -x "$VENV/bin/python" && -x "$VENV/bin/backend.ai" ]]; then
        echo "$VENV"
        return 0
    fi
    local py start
    py=$(find_python)
    start=$(date +%s)
    echo "== building $VENV with $py ($PKG)" >&2
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$PKG" >&2
    "$VENV/bin/python" -c 'import ai.backend.appproxy.worker.server' >&2
    touch "$MARKER"
    echo "== venv ready in $(($(date +%s) - start)) s" >&2
    echo "$VENV"
}

# TOML basic string
tq() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

cmd_config() {
    [[ $# -ge 1 ]] || usage
    local out=$1
    shift
    local coordinator=${BACKENDAI_WORKER_COORDINATOR:-http://127.0.0.1:10200}
    local authority=${BACKENDAI_WORKER_AUTHORITY:-worker-e2e}
    local api_host=${BACKENDAI_WORKER_API_HOST:-127.0.0.1}
    local api_port=${BACKENDAI_WORKER_API_PORT:-10201}
    local adv_host=${BACKENDAI_WORKER_ADVERTISED_HOST:-}
    local port_range=${BACKENDAI_WORKER_PORT_RANGE:-10205-10300}
    local wildcard_domain=${BACKENDAI_WORKER_WILDCARD_DOMAIN:-}
    local wildcard_port=${BACKENDAI_WORKER_WILDCARD_PORT:-10250}
    local protocol=${BACKENDAI_WORKER_PROTOCOL:-http}
    local traffics=${BACKENDAI_WORKER_TRAFFICS:-interactive,inference}
    local redis=${BACKENDAI_WORKER_REDIS:-redis://127.0.0.1:6379}
    local sentinel=${BACKENDAI_WORKER_REDIS_SENTINEL:-}
    local service_name=${BACKENDAI_WORKER_REDIS_SERVICE_NAME:-}
    local api_secret=${BACKENDAI_WORKER_API_SECRET:-some_api_secret}
    local jwt_secret=${BACKENDAI_WORKER_JWT_SECRET:-some_jwt_secret}
    local permit_secret=${BACKENDAI_WORKER_PERMIT_SECRET:-some_permit_hash_secret}
    local heartbeat=${BACKENDAI_WORKER_HEARTBEAT:-10.0}
    local aiomon=${BACKENDAI_WORKER_AIOMONITOR_PORT:-48600}
    local ipc_dir=${BACKENDAI_WORKER_IPC_DIR:-/tmp/backend.ai/ipc}
    local log_level=${BACKENDAI_WORKER_LOG_LEVEL:-INFO}
    while [[ $# -gt 0 ]]; do
        [[ $# -ge 2 ]] || die "option $1 needs a value"
        case "$1" in
        --coordinator) coordinator=$2 ;;
        --authority) authority=$2 ;;
        --api-host) api_host=$2 ;;
        --api-port) api_port=$2 ;;
        --advertised-host) adv_host=$2 ;;
        --port-range) port_range=$2 ;;
        --wildcard-domain) wildcard_domain=$2 ;;
        --wildcard-port) wildcard_port=$2 ;;
        --protocol) protocol=$2 ;;
        --traffics) traffics=$2 ;;
        --redis) redis=$2 ;;
        --redis-sentinel) sentinel=$2 ;;
        --redis-service-name) service_name=$2 ;;
        --api-secret) api_secret=$2 ;;
        --jwt-secret) jwt_secret=$2 ;;
        --permit-secret) permit_secret=$2 ;;
        --heartbeat) heartbeat=$2 ;;
        --aiomonitor-port) aiomon=$2 ;;
        --ipc-dir) ipc_dir=$2 ;;
        --log-level) log_level=$2 ;;
        *) die "unknown config option $1" ;;
        esac
        shift 2
    done
    [[ -n "$adv_host" ]] || adv_host=$api_host
    [[ "$api_port" =~ ^[0-9]+$ ]] || die "--api-port must be a number"
    [[ "$aiomon" =~ ^[0-9]+$ ]] || die "--aiomonitor-port must be a number"
    [[ "$heartbeat" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--heartbeat must be a number"
    case "$protocol" in http | tcp) ;; *) die "--protocol must be http or tcp" ;; esac

    # redis://[:password@]host[:port][/db]
    [[ "$redis" =~ ^redis://(([^@]*)@)?([^:/@]+)(:([0-9]+))?(/[0-9]*)?$ ]] ||
        die "--redis must look like redis://[:PASSWORD@]HOST[:PORT][/DB], got $redis"
    local redis_pw=${BASH_REMATCH[2]#:} redis_host=${BASH_REMATCH[3]} redis_port=${BASH_REMATCH[5]:-6379}

    local redis_pw_line=""
    if [[ -n "$redis_pw" ]]; then
        redis_pw_line="password = $(tq "$redis_pw")"
    fi
    # [redis] addr, or sentinel + service_name (upstream ignores addr then).
    local redis_addr_lines="addr = { host = $(tq "$redis_host"), port = $redis_port }"
    if [[ -n "$sentinel" || -n "$service_name" ]]; then
        [[ -n "$sentinel" && -n "$service_name" ]] ||
            die "--redis-sentinel and --redis-service-name go together"
        local s list=""
        local -a sl
        IFS=, read -r -a sl <<<"$sentinel"
        for s in "${sl[@]}"; do
            [[ "$s" =~ ^([^:]+):([0-9]+)$ ]] || die "--redis-sentinel: $s is not HOST:PORT"
            list+="${list:+, }{ host = $(tq "${BASH_REMATCH[1]}"), port = ${BASH_REMATCH[2]} }"
        done
        redis_addr_lines="sentinel = [$list]
service_name = $(tq "$service_name")"
    fi

    local traffics_toml="" t
    local -a tl
    IFS=, read -r -a tl <<<"$traffics"
    for t in "${tl[@]}"; do
        case "$t" in interactive | inference) ;; *) die "--traffics: unknown traffic '$t'" ;; esac
        traffics_toml+="${traffics_toml:+, }$(tq "$t")"
    done

    local mode frontend
    if [[ -n "$wildcard_domain" ]]; then
        [[ "$wildcard_domain" == .* ]] || die "--wildcard-domain must start with a dot"
        [[ "$wildcard_port" =~ ^[0-9]+$ ]] || die "--wildcard-port must be a number"
        mode=wildcard
        frontend="[proxy_worker.wildcard_domain]
bind_addr = { host = $(tq "$api_host"), port = $wildcard_port }
domain = $(tq "$wildcard_domain")"
    else
        [[ "$port_range" =~ ^([0-9]+)-([0-9]+)$ ]] || die "--port-range must be LO-HI"
        mode=port
        frontend="[proxy_worker.port_proxy]
bind_host = $(tq "$api_host")
advertised_host = $(tq "$adv_host")
bind_port_range = [${BASH_REMATCH[1]}, ${BASH_REMATCH[2]}]"
    fi

    mkdir -p "$(dirname "$out")"
    local tmp="$out.tmp.$$"
    cat >"$tmp" <<EOF
# Backend.AI App Proxy worker $VERSION, written by scripts/backendai-worker.sh config
[redis]
$redis_addr_lines
$redis_pw_line

[proxy_worker]
coordinator_endpoint = $(tq "$coordinator")
authority = $(tq "$authority")
frontend_mode = "$mode"
protocol = "$protocol"
accepted_traffics = [$traffics_toml]
api_bind_addr = { host = $(tq "$api_host"), port = $api_port }
api_advertised_addr = { host = $(tq "$adv_host"), port = $api_port }
announce_addr = { host = $(tq "$adv_host"), port = $api_port }
tls_listen = false
tls_advertised = false
heartbeat_period = $heartbeat
aiomonitor_termui_port = $aiomon
aiomonitor_webui_port = $((aiomon + 1000))
ipc_base_path = $(tq "$ipc_dir")
event_loop = "asyncio"

$frontend

[secrets]
api_secret = $(tq "$api_secret")
jwt_secret = $(tq "$jwt_secret")

[permit_hash]
secret = $(tq "$permit_secret")

[logging]
level = $(tq "$log_level")
drivers = ["console"]

[logging.console]
colored = false
format = "verbose"

[logging.pkg_ns]
"" = "WARNING"
"ai.backend" = $(tq "$log_level")
"aiohttp.access" = "WARNING"

[debug]
enabled = false
log_events = true
EOF
    mv "$tmp" "$out"
    echo "$out"
}

cmd_run() {
    [[ $# -ge 1 ]] || usage
    local cfg=$1
    shift
    [[ -f "$cfg" ]] || die "config file $cfg not found"
    cfg=$(cd "$(dirname "$cfg")" && pwd)/$(basename "$cfg")
    cmd_venv >/dev/null
    export BACKENDAI_PROMETHEUS_DIR=${BACKENDAI_PROMETHEUS_DIR:-$(dirname "$cfg")/prometheus}
    mkdir -p "$BACKENDAI_PROMETHEUS_DIR"
    exec "$VENV/bin/backend.ai" app-proxy-worker start-server -f "$cfg" "$@"
}

case "${1:-}" in
python)
    find_python
    ;;
venv)
    shift
    cmd_venv "$@"
    ;;
config)
    shift
    cmd_config "$@"
    ;;
run)
    shift
    cmd_run "$@"
    ;;
-h | --help | help) usage 0 ;;
*) usage ;;
esac

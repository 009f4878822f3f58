#!/usr/bin/env bash
# Fuzzes the running API against its own /openapi.json with schemathesis:
#
#   bash scripts/fuzz.sh          (or: make fuzz)
#
# Starts the debug coordinator (built with `cargo build --locked --bin
# appproxy-coordinator` unless APPPROXY_COORDINATOR_BIN names one) on a
# temporary data directory and a free port with known tokens, registers two
# workers that between them can take any route the document calls valid (a
# port worker over ports 1-65535 and a wildcard worker), and runs schemathesis
# with every check three times: with the manager token, with the worker
# bootstrap token, and with the port worker's own token (its id filled in for
# `{id}` and `worker_id`, so its own endpoints are reached). Each run is
# bounded in examples per operation; the watch streams are read up to a few
# events. Exits non-zero on any failure; stops the coordinator and removes
# everything it made on the way out.
#
# Schemathesis lives in a venv outside the repository, made on first use and
# kept: FUZZ_VENV, default ${XDG_CACHE_HOME:-~/.cache}/appproxy-coordinator/fuzz-venv.
# FUZZ_MAX_EXAMPLES (default 50) bounds the test cases per operation and phase;
# FUZZ_SEED makes a run repeatable.
#
# Schemathesis applies scripts/fuzz_hooks.py: the three rules of the document
# that JSON Schema cannot state (see crates/core/src/domain/schemas.rs) are kept by the
# data it generates as valid.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

SCHEMATHESIS_VERSION=4.32.5
VENV=${FUZZ_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/appproxy-coordinator/fuzz-venv}
MAX_EXAMPLES=${FUZZ_MAX_EXAMPLES:-50}
MANAGER_TOKEN=fuzz-manager-token-0123456789
BOOTSTRAP_TOKEN=fuzz-bootstrap-token-0123456789

started=$(date +%s)

# --- schemathesis, in its own venv -----------------------------------------
if [ ! -x "$VENV/bin/schemathesis" ] || [ "$(cat "$VENV/.version" 2>/dev/null)" != "$SCHEMATHESIS_VERSION" ]; then
    echo "== installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
    echo "$SCHEMATHESIS_VERSION" >"$VENV/.version"
fi

# --- the coordinator ---------------------------------------------------------
if [ -n "${APPPROXY_COORDINATOR_BIN:-}" ]; then
    BIN=$APPPROXY_COORDINATOR_BIN
else
    cargo build --locked --quiet --bin appproxy-coordinator
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/appproxy-coordinator
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/appproxy-fuzz.XXXXXX")
PID=
cleanup() {
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The failure limit is off: schemathesis presents wrong and missing credentials
# on purpose (the `ignored_auth` check), and a limited address would answer
# 429 to the right ones too. tests/auth.rs covers the limit.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT

# Workers stay Ready for the whole run (nothing else heartbeats them), so a
# valid route always has a worker to go to.
APPPROXY_MANAGER_TOKEN=$MANAGER_TOKEN APPPROXY_WORKER_TOKEN=$BOOTSTRAP_TOKEN \
    "$BIN" serve --bind "127.0.0.1:$PORT" --data-dir "$WORK/data" --kubernetes=false \
    --heartbeat-timeout 1h --bookmark-interval 1s --keepalive-interval 1s \
    --auth-failures-per-minute 0 \
    >"$WORK/coordinator.log" 2>&1 &
PID=$!

for _ in $(seq 1 100); do
    curl -fsS "$BASE/readyz" >/dev/null 2>&1 && break
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/coordinator.log"; echo "the coordinator did not start" >&2; exit 1; }
    sleep 0.1
done
curl -fsS "$BASE/readyz" >/dev/null

register() {
    curl -fsS -X POST "$BASE/workers/register" \
        -H "Authorization: Bearer $BOOTSTRAP_TOKEN" -H 'Content-Type: application/json' \
        -d "$1"
}
# Two fresh workers before each run (a run may remove the ones before it):
# sets WORKER_ID and WORKER_TOKEN to the port worker's.
fresh_workers() {
    local port_worker
    port_worker=$(register "{\"name\": \"fuzz-port-$1\", \"api_url\": \"http://127.0.0.1:1\",
        \"frontend\": {\"mode\": \"port\", \"host\": \"127.0.0.1\", \"port_range\": [1, 65535]}}")
    register "{\"name\": \"fuzz-wildcard-$1\", \"api_url\": \"http://127.0.0.1:2\",
        \"frontend\": {\"mode\": \"wildcard\", \"domain\": \"$1.fuzz.test\"}}" >/dev/null
    WORKER_ID=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["worker"]["id"])' <<<"$port_worker")
    WORKER_TOKEN=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])' <<<"$port_worker")
}

# --- the runs ----------------------------------------------------------------
# Not the stateful phase by default: it links a real worker id from
# `GET /workers` into `POST /routes`, pinning a route to a worker that cannot
# take it (a port route on the wildcard worker), which the coordinator answers
# with its documented 503 `no-eligible-worker` — and schemathesis counts every
# 5xx as a server error, so the run failed or passed by chance.
# FUZZ_PHASES=examples,coverage,fuzzing,stateful runs it too.
PHASES=${FUZZ_PHASES:-examples,coverage,fuzzing}
cd "$WORK"
failed=0
summary=()
run() {
    local name=$1 token=$2 config=$3
    shift 3
    echo
    echo "== schemathesis with the $name token"
    local begun=$(date +%s) status=0
    SCHEMATHESIS_HOOKS=fuzz_hooks PYTHONPATH="$ROOT/scripts" \
        "$VENV/bin/schemathesis" --config-file "$config" run "$BASE/openapi.json" \
        --checks all --max-examples "$MAX_EXAMPLES" --workers 1 \
        --phases "$PHASES" \
        --generation-database none --request-timeout 10 --no-color \
        ${FUZZ_SEED:+--seed "$FUZZ_SEED"} \
        -H "Authorization: Bearer $token" "$@" || status=$?
    summary+=("$name token: $([ "$status" = 0 ] && echo passed || echo "FAILED ($status)") in $(($(date +%s) - begun)) s")
    [ "$status" = 0 ] || failed=1
}

cat >"$WORK/common.toml" <<EOF
max-stream-events = 1
EOF

fresh_workers manager
# Removing workers takes away where routes can go: that operation runs last,
# on its own, against the run's port worker (so one removal succeeds).
run manager "$MANAGER_TOKEN" "$WORK/common.toml" --exclude-operation-id deleteWorker
cat >"$WORK/delete.toml" <<EOF
[parameters]
"path.id" = "$WORKER_ID"
EOF
run "manager (deleteWorker)" "$MANAGER_TOKEN" "$WORK/delete.toml" --include-operation-id deleteWorker
fresh_workers bootstrap
run bootstrap "$BOOTSTRAP_TOKEN" "$WORK/common.toml"
fresh_workers worker
cat >"$WORK/worker.toml" <<EOF
max-stream-events = 1

[parameters]
"path.id" = "$WORKER_ID"
"query.worker_id" = "$WORKER_ID"
EOF
# The worker removing itself would end the run's access: that one is covered
# by tests/api/workers.rs.
run per-worker "$WORKER_TOKEN" "$WORK/worker.toml" --exclude-operation-id deleteWorker

if ! kill -0 "$PID" 2>/dev/null; then
    echo "the coordinator died during the run:" >&2
    tail -n 50 "$WORK/coordinator.log" >&2
    failed=1
fi
if grep -q "panicked" "$WORK/coordinator.log"; then
    echo "the coordinator panicked:" >&2
    grep -A5 "panicked" "$WORK/coordinator.log" >&2
    failed=1
fi

echo
echo "== fuzz summary ($MAX_EXAMPLES examples per operation and phase)"
printf '%s\n' "${summary[@]}"
echo "total: $(($(date +%s) - started)) s"
exit "$failed"

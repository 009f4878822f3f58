#!/usr/bin/env bash
# Measures `import-backendai`: an upstream 26.9.6 database (its schema from
# tests/fixtures/backendai-26.9.6-schema.sql) with WORKERS workers (half in
# port mode, half wildcard) and CIRCUITS circuits (half inference with an
# endpoint, half interactive with a conf token) imported into an empty
# SQLite file and an empty PostgreSQL database by the release binary, under
# /usr/bin/time: wall time and peak RSS of each.
#
#   scripts/bench_import_backendai.sh [CIRCUITS [WORKERS]]    (10000 50)
#
# Needs psql and a PostgreSQL server where the role may create databases:
# $APPPROXY_TEST_DATABASE_URL [postgres://postgres@127.0.0.1:5432/postgres].
set -euo pipefail

CIRCUITS=${1:-10000}
WORKERS=${2:-50}
ADMIN=${APPPROXY_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${APPPROXY_BIN:-$ROOT/target/release/appproxy-coordinator}
base=${ADMIN%/*}
up="bench_import_upstream_$$"
target="bench_import_target_$$"
work=$(mktemp -d)
cleanup() {
    rm -rf "$work"
    psql -q "$ADMIN" -c "DROP DATABASE IF EXISTS $up WITH (FORCE)" \
        -c "DROP DATABASE IF EXISTS $target WITH (FORCE)" >/dev/null
}
trap cleanup EXIT
[[ -x $BIN ]] || { echo "no $BIN: cargo build --release" >&2; exit 1; }

psql -q "$ADMIN" -c "CREATE DATABASE $up" -c "CREATE DATABASE $target" >/dev/null
psql -q -v ON_ERROR_STOP=1 "$base/$up" -f "$ROOT/tests/fixtures/backendai-26.9.6-schema.sql" >/dev/null
psql -q -v ON_ERROR_STOP=1 "$base/$up" >/dev/null <<EOF
SET search_path TO public;
INSERT INTO workers (id, authority, frontend_mode, protocol, hostname, tls_listen,
    tls_advertised, api_port, available_slots, occupied_slots, port_range, wildcard_domain,
    wildcard_traffic_port, nodes, accepted_traffics, filtered_apps_only, status)
SELECT uuid_generate_v4(), 'worker-' || w,
    CASE WHEN w % 2 = 0 THEN 'PORT' ELSE 'WILDCARD_DOMAIN' END::frontendmode, 'HTTP',
    'proxy-' || w || '.example.com', false, false, 10201, 1000, 0,
    CASE WHEN w % 2 = 0 THEN ARRAY[20000, 29999] END,
    CASE WHEN w % 2 = 1 THEN '.w' || w || '.example.com' END,
    CASE WHEN w % 2 = 1 THEN 443 END, 1, '{INTERACTIVE,INFERENCE}', false, 'ALIVE'
FROM generate_series(0, $WORKERS - 1) AS w;
CREATE TEMP TABLE ws AS SELECT row_number() OVER (ORDER BY authority) - 1 AS n, id,
    frontend_mode FROM workers;
INSERT INTO circuits (id, app, protocol, worker, app_mode, frontend_mode, port, subdomain,
    envs, open_to_public, user_id, endpoint_id, runtime_variant, session_ids, route_info)
SELECT uuid_generate_v4(), CASE WHEN c % 2 = 0 THEN 'model' ELSE 'jupyter' END, 'HTTP', ws.id,
    CASE WHEN c % 2 = 0 THEN 'INFERENCE' ELSE 'INTERACTIVE' END::appmode, ws.frontend_mode,
    CASE WHEN ws.frontend_mode = 'PORT' THEN 20000 + c / $WORKERS END,
    CASE WHEN ws.frontend_mode = 'WILDCARD_DOMAIN' THEN 'app-' || c END,
    '{}', false, uuid_generate_v4(),
    CASE WHEN c % 2 = 0 THEN uuid_generate_v4() END,
    CASE WHEN c % 2 = 0 THEN 'vllm' END,
    CASE WHEN c % 2 = 1 THEN ARRAY[uuid_generate_v4()] ELSE '{}' END,
    jsonb_build_array(jsonb_build_object('session_id', uuid_generate_v4(),
        'kernel_host', '10.0.' || (c / 250) || '.' || (c % 250), 'kernel_port', 8000,
        'protocol', 'http', 'traffic_ratio', 1.0))
FROM generate_series(0, $CIRCUITS - 1) AS c JOIN ws ON ws.n = c % $WORKERS;
INSERT INTO endpoints (id, health_check_enabled, health_check_config)
SELECT endpoint_id, true, '{"path": "/health"}' FROM circuits WHERE endpoint_id IS NOT NULL;
INSERT INTO tokens (id, kernel_host, kernel_port, session_id, user_uuid, group_id,
    access_key, domain_name)
SELECT uuid_generate_v4(), '10.0.0.1', 8888, session_ids[1], user_id, uuid_generate_v4(),
    'AK', 'default' FROM circuits WHERE app_mode = 'INTERACTIVE';
EOF

run() {
    local label=$1 url=$2
    /usr/bin/time -f "%e %M" -o "$work/time" "$BIN" import-backendai --from "$base/$up" \
        --database-url "$url" >"$work/out" 2>"$work/err" || { cat "$work/out" "$work/err" >&2; exit 1; }
    read -r seconds kib <"$work/time"
    grep -E '^(circuits|workers):' "$work/out" | tr '\n' ' '
    echo
    echo "$label: $CIRCUITS circuits on $WORKERS workers imported in ${seconds}s, peak RSS $((kib / 1024)) MiB"
}
run "SQLite" "sqlite://$work/coordinator.db"
run "PostgreSQL" "$base/$target"

#!/usr/bin/env bash
# Checks of the Helm chart in charts/appproxy-coordinator, runnable from a fresh
# clone with nothing but python3 (and, optionally, kubectl):
#
#   bash scripts/chart-check.sh
#
# The real Helm engine comes from the PyPI package helm-python-sdk: its wheel
# bundles libhelm_c, Helm's Go SDK (v4) built as a C library, and binds to it
# with ctypes. There is no `helm` binary and nothing is downloaded besides the
# wheels, so this works wherever PyPI is reachable (and fully offline once the
# venv exists). Every rendered document is validated against the Kubernetes
# OpenAPI schemas of Kubernetes $KUBE_VERSION bundled in kubernetes-validate.
#
# Checks (one line each, then a summary line):
#   - `helm lint --strict` of each configuration below
#   - rendering of each configuration, every document validated (strict:
#     unknown fields are errors); CRD-based kinds without a schema are skipped
#     by name. The configurations: no values at all (the first install:
#     embedded SQLite on a PersistentVolumeClaim, generated tokens),
#     ci/postgres-values.yaml (PostgreSQL, inline credentials) and
#     ci/production-values.yaml (PostgreSQL, existing Secret, 3 replicas),
#     ci/tls-values.yaml (HTTPS with a kubernetes.io/tls Secret),
#     ci/backendai-values.yaml (the Backend.AI drop-in),
#     ci/store-tls-values.yaml (TLS to PostgreSQL and Redis: CAs from a
#     ConfigMap and a Secret, a client certificate, rediss://)
#   - the no-values install: one replica, Recreate, the claim, the tokens
#   - the TLS install: the Secret mounted, the coordinator's TLS flags set, the
#     probes, Service, ServiceMonitor and NetworkPolicy on HTTPS
#   - TLS to the stores: the CAs and the client certificate mounted read-only
#     in one projected volume per store, PGSSLMODE (verify-full with a CA),
#     PGSSLROOTCERT/PGSSLCERT/PGSSLKEY and APPPROXY_REDIS_CA_FILE pointing
#     into them; nothing of it in the other configurations
#   - the status page: ui.enabled sets APPPROXY_UI, ui.viewerToken goes into
#     the Secret (viewer-token, read by an optional secretKeyRef) only
#   - the Backend.AI install: its secrets and Redis URL in the Secret and
#     read from it (never plain env values, nor in the ConfigMap), the other
#     backendai values as plain env, the second Service port; nothing of it
#     when backendai.enabled is false; the in-cluster advertised URL by default
#   - generated tokens survive an upgrade: rendered against a stub API server
#     that holds the Secret of the first install, so `lookup` finds it; the
#     same for the Backend.AI secrets, also across turning the mode off and on
#   - ci/bad-values.yaml (replicaCount: "two") rejected by values.schema.json
#   - other values the chart must reject with a clear message (among them
#     replicaCount > 1 without a database, and a Backend.AI install without
#     redisUrl or with its secrets in extraEnv)
#   - the Role grants exactly the expected resources and verbs
#   - the Deployment keeps its production properties (security context,
#     probes, grace period, env from the Secret, ...)
#   - the rendered config.toml is accepted by the coordinator binary, and every
#     APPPROXY_* variable the Deployments set is one the binary reads
#   - the coordinator runs as the rendered pods would (their args, env, Secret
#     and ConfigMap files; only the listen address moves to a free local port):
#     the no-values pod answers its probes on its SQLite volume, authenticates
#     with the generated tokens, stops cleanly on SIGTERM and finds its data
#     again after a restart; the TLS pod answers its probes over HTTPS with the
#     mounted certificate (a throwaway one made with openssl); the Backend.AI
#     pod (its Redis URL pointed at CHART_CHECK_REDIS_URL, default
#     redis://127.0.0.1:6379/0) answers its probes and Backend.AI's GET /status
#     with the advertised URL, and reads every backendai value as rendered;
#     with a rediss:// URL it starts too, and /health reports that plaintext
#     Redis unhealthy (no fallback to plaintext)
#   - the Grafana dashboard (dashboards/appproxy-coordinator.json, shipped as a
#     ConfigMap when dashboard.enabled) uses only metric names, and label names,
#     that the coordinator exports: it is exercised through its API (a worker,
#     a watch stream, a route, a failover) and its /metrics scraped
#   - `kubectl apply --dry-run=client`, if kubectl reaches an API server
#     (kubectl needs API discovery even for a client-side dry run)
#
# The coordinator binary is built with `cargo build --locked --bin
# appproxy-coordinator` (a no-op when `cargo test` has just built it) unless
# APPPROXY_COORDINATOR_BIN names one.
#
# Environment: CHART_CHECK_VENV (default .venv-chart), APPPROXY_COORDINATOR_BIN,
# CARGO_TARGET_DIR (default target), CHART_CHECK_REDIS_URL (the Redis the
# Backend.AI pod runs against; skipped when it does not answer).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CHART=charts/appproxy-coordinator
VENV=${CHART_CHECK_VENV:-.venv-chart}
KUBE_VERSION=1.30.0
# Pinned; update together and re-run. helm-python-sdk 0.2.2 = Helm SDK v4.2.3.
REQUIREMENTS=(
    "helm-python-sdk==0.2.2"
    "kubernetes-validate==1.37.0"
)

start=$(date +%s)

# The venv is rebuilt only when it is missing or the pins changed; the stamp is
# written last, so an interrupted install is redone on the next run.
stamp="$VENV/.chart-check-requirements"
if [[ ! -x "$VENV/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "${REQUIREMENTS[*]}" ]]; then
    echo "== setting up $VENV (${REQUIREMENTS[*]})"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${REQUIREMENTS[@]}"
    printf '%s' "${REQUIREMENTS[*]}" >"$stamp"
fi

bin=${APPPROXY_COORDINATOR_BIN:-}
if [[ -z "$bin" ]]; then
    # Built from the sources at hand, so that the checks see the metrics and
    # flags of this revision; cargo does nothing if it is up to date.
    echo "== cargo build --locked --bin appproxy-coordinator"
    cargo build --locked --quiet --bin appproxy-coordinator
    bin=${CARGO_TARGET_DIR:-target}/debug/appproxy-coordinator
fi

status=0
CHART="$CHART" KUBE_VERSION="$KUBE_VERSION" COORDINATOR_BIN="$bin" START="$start" \
    "$VENV/bin/python" - <<'PY' || status=$?
import base64
import contextlib
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from importlib.metadata import version

import helm_python as helm
import kubernetes_validate
import yaml

CHART = os.environ["CHART"]
KUBE_VERSION = os.environ["KUBE_VERSION"]
COORDINATOR_BIN = os.environ.get("COORDINATOR_BIN", "")
RELEASE, NAMESPACE = "appproxy", "appproxy"
FULLNAME = f"{RELEASE}-appproxy-coordinator"

# Kinds defined by CRDs of other projects: kubernetes-validate has no schema
# for them, so they are skipped by name (and checked structurally below).
SKIP_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# What the coordinator calls, resource by resource. The chart must grant
# exactly this: no more (least privilege), no less (the calls would fail).
EXPECTED_RBAC = {
    # What the coordinator calls; tests/k8s/pods.rs derives the same set from the
    # requests it records and compares it with templates/rbac.yaml.
    ("", "pods"): {"list", "watch"},
    ("appproxy.backend.ai", "appproxyroutes"): {"list", "watch", "create", "patch", "delete"},
    ("appproxy.backend.ai", "appproxyroutes/status"): {"patch"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
    ("events.k8s.io", "events"): {"create"},
}

# The keys of config.toml the coordinator understands (src/config.rs).
CONFIG_KEYS = {"bind", "data_dir", "log_format", "max_body_bytes", "max_connections", "shutdown_timeout",
               "heartbeat_timeout", "failover_grace"}

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)

passed, failed, skipped = 0, 0, 0


class CheckFailed(Exception):
    pass


def ensure(condition, message):
    if not condition:
        raise CheckFailed(message)


@contextlib.contextmanager
def native_stderr():
    """Collects what libhelm_c logs on fd 2 (Helm's warnings), so that it is
    shown only when a check fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def check(name, fn):
    global passed, failed, skipped
    with native_stderr() as log:
        try:
            detail = fn()
            outcome = None
        except CheckFailed as e:
            outcome = str(e)
        except helm.HelmError as e:
            outcome = f"{type(e).__name__}: {e}"
        except Exception as e:  # a bug in a check is a failure too
            outcome = f"{type(e).__name__}: {e}"
        log.seek(0)
        native_log = log.read().decode(errors="replace").strip()
    if outcome is None and isinstance(detail, Skip):
        skipped += 1
        print(f"SKIP  {name}: {detail.reason}", flush=True)
    elif outcome is None:
        passed += 1
        print(f"PASS  {name}" + (f" ({detail})" if detail else ""), flush=True)
    else:
        failed += 1
        print(f"FAIL  {name}: {outcome}", flush=True)
        if native_log:
            print("      helm said:\n      " + native_log.replace("\n", "\n      "), flush=True)


class Skip:
    def __init__(self, reason):
        self.reason = reason


def load_values(*files):
    merged = {}
    for f in files:
        with open(os.path.join(CHART, f)) as fh:
            data = yaml.safe_load(fh) or {}
        merged = deep_merge(merged, data)
    return merged


def deep_merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(values, chart_dir=CHART):
    """Renders offline, as `helm template` and `helm install --dry-run` do:
    `lookup` finds nothing."""
    with helm.Chart.load(chart_dir) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(rendered):
    """The manifests of a render, in template order, without NOTES.txt."""
    docs = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                docs.append((path, doc))
    return docs


def find(docs, kind):
    return [d for _, d in docs if d.get("kind") == kind]


def one(docs, kind):
    found = find(docs, kind)
    ensure(len(found) == 1, f"expected one {kind}, rendered {len(found)}")
    return found[0]


def validate_all(docs):
    """Validates every document against the Kubernetes schemas (strict)."""
    kinds, skipped_kinds = [], []
    seen = set()
    for path, doc in docs:
        kind, api = doc.get("kind"), doc.get("apiVersion")
        name = doc.get("metadata", {}).get("name")
        key = (api, kind, name)
        ensure(key not in seen, f"{kind}/{name} rendered twice")
        seen.add(key)
        labels = doc.get("metadata", {}).get("labels", {})
        missing = [l for l in STANDARD_LABELS if l not in labels]
        ensure(not missing, f"{kind}/{name} lacks the labels {missing}")
        ensure(doc["metadata"].get("namespace") == NAMESPACE, f"{kind}/{name} is not in the release namespace")
        if (api, kind) in SKIP_KINDS:
            skipped_kinds.append(f"{kind}/{name}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            raise CheckFailed(f"{path}: {kind}/{name} at {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            raise CheckFailed(f"{path}: {e.message} (add it to SKIP_KINDS only if it is a CRD kind)")
        kinds.append(kind)
    detail = f"{len(kinds)} documents valid against Kubernetes {KUBE_VERSION}: {', '.join(kinds)}"
    if skipped_kinds:
        detail += f"; skipped (CRD kind, no schema in kubernetes-validate): {', '.join(skipped_kinds)}"
    return detail


def lint(values_files):
    values = load_values(*values_files)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    # Severity: 1 info, 2 warning, 3 error; --strict fails on warnings too.
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    problems_text = "; ".join(f"{m['path']}: {m['error'].strip()}" for m in problems)
    ensure(not problems and not report.get("errors"), problems_text or "; ".join(report["errors"]))
    infos = [m["error"] for m in report.get("messages", []) if m.get("severity") == 1]
    return f"{report['total_charts_linted']} chart, 0 warnings, 0 errors" + (f"; info: {'; '.join(infos)}" if infos else "")


def expect_rejected(values, *needles, chart_dir=CHART, by_schema=False):
    """Rendering must fail, and the message must name the problem."""
    try:
        render(values, chart_dir)
    except helm.HelmError as e:
        if by_schema and not isinstance(e, helm.HelmValuesError):
            raise CheckFailed(f"rejected by a template, not by values.schema.json: {e}")
        message = str(e)
        for needle in needles:
            ensure(needle in message, f"rejected, but the message does not mention {needle!r}: {message}")
        return "rejected: " + " ".join(message.split())[:160]
    raise CheckFailed("the chart rendered; it must refuse these values")


# ---------------------------------------------------------------------------

print(
    f"== chart checks: {CHART} with Helm SDK {helm.helm_sdk_version()} (helm-python-sdk {version('helm-python-sdk')}), "
    f"kubernetes-validate {version('kubernetes-validate')} against Kubernetes {KUBE_VERSION}",
    flush=True,
)

postgres = ["ci/postgres-values.yaml"]
production = ["ci/production-values.yaml"]
tls = ["ci/tls-values.yaml"]
backendai = ["ci/backendai-values.yaml"]
store_tls = ["ci/store-tls-values.yaml"]
# label -> values files; "default" is the first install with no values at all.
CONFIGURATIONS = {"default": [], "postgres": postgres, "production": production, "tls": tls, "backendai": backendai,
                  "storetls": store_tls}
# The configurations in Backend.AI mode.
BACKENDAI_LABELS = {"backendai", "storetls"}
rendered = {}  # label -> [(template path, document)]
raw = {}       # label -> {template path: rendered text}


def render_and_validate(label, files):
    def run():
        values = load_values(*files)
        raw[label] = render(values)
        rendered[label] = documents(raw[label])
        return validate_all(rendered[label])
    return run


def describe(files):
    return " + ".join(files) if files else "no values"


for label, files in CONFIGURATIONS.items():
    check(f"helm lint --strict ({describe(files)})", lambda files=files: lint(files))
for label, files in CONFIGURATIONS.items():
    check(f"render + validate: {describe(files)}", render_and_validate(label, files))


def template(label, name):
    """The rendered text of templates/<name> in a configuration."""
    texts = raw.get(label)
    ensure(texts is not None, f"the {label} render failed")
    path = f"{os.path.basename(CHART)}/templates/{name}"
    ensure(path in texts, f"{label}: {path} not rendered")
    return texts[path]


def container_of(deployment):
    containers = deployment["spec"]["template"]["spec"]["containers"]
    ensure(len(containers) == 1, f"{len(containers)} containers")
    return containers[0]


def secret_data(doc):
    return {k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()}


def first_install():
    docs = rendered.get("default")
    ensure(docs is not None, "the no-values render failed")
    dep = one(docs, "Deployment")
    ensure(dep["spec"]["replicas"] == 1, f"replicas {dep['spec']['replicas']}")
    ensure(dep["spec"]["strategy"] == {"type": "Recreate"}, f"strategy {dep['spec']['strategy']} (SQLite needs Recreate)")
    pod = dep["spec"]["template"]["spec"]
    c = container_of(dep)
    env = {e["name"]: e for e in c["env"]}
    ensure("APPPROXY_DATABASE_URL" not in env, "APPPROXY_DATABASE_URL is set: the embedded SQLite needs it unset")
    ensure(env["APPPROXY_DATA_DIR"].get("value") == "/data", "APPPROXY_DATA_DIR is not /data")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    pvc = one(docs, "PersistentVolumeClaim")
    claim = volumes[mounts["/data"]].get("persistentVolumeClaim", {}).get("claimName")
    ensure(claim == pvc["metadata"]["name"], f"/data is {volumes[mounts['/data']]}, not the claim {pvc['metadata']['name']}")
    spec = pvc["spec"]
    ensure(spec["accessModes"] == ["ReadWriteOnce"], f"accessModes {spec['accessModes']}")
    ensure(spec["resources"]["requests"]["storage"] == "1Gi", f"size {spec['resources']['requests']['storage']}")
    ensure("storageClassName" not in spec, "storageClassName set: the default class should be used")
    ensure(pvc["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep", "the claim is not kept on uninstall")
    secret = one(docs, "Secret")
    ensure(secret["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep", "the Secret is not kept on uninstall")
    tokens = secret_data(secret)
    ensure(set(tokens) == {"manager-token", "worker-token"}, f"Secret keys {sorted(tokens)}")
    for key, token in tokens.items():
        ensure(len(token) >= 32 and token.isalnum(), f"{key} is not a long random token ({len(token)} characters)")
    ensure(tokens["manager-token"] != tokens["worker-token"], "the manager and worker tokens are equal")
    for var, key in (("APPPROXY_MANAGER_TOKEN", "manager-token"), ("APPPROXY_WORKER_TOKEN", "worker-token")):
        ref = env[var].get("valueFrom", {}).get("secretKeyRef")
        ensure(ref == {"name": secret["metadata"]["name"], "key": key}, f"{var} from {ref}")
    # The status page: on, and its viewer token only when the Secret has one.
    ensure(env["APPPROXY_UI"].get("value") == "true", f"APPPROXY_UI {env['APPPROXY_UI']}")
    ref = env["APPPROXY_VIEWER_TOKEN"].get("valueFrom", {}).get("secretKeyRef")
    ensure(ref == {"name": secret["metadata"]["name"], "key": "viewer-token", "optional": True}, f"APPPROXY_VIEWER_TOKEN from {ref}")
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    for name, annotation in (("secret.yaml", "checksum/secret"), ("configmap.yaml", "checksum/config")):
        digest = hashlib.sha256(template("default", name).encode()).hexdigest()
        ensure(annotations.get(annotation) == digest, f"{annotation} is not the sha256 of the rendered {name}")
    again = secret_data(one(documents(render({})), "Secret"))
    ensure(again != tokens, "a second offline render drew the same tokens")
    return (f"1 replica, Recreate, SQLite in /data on PVC {pvc['metadata']['name']} ({spec['resources']['requests']['storage']}, "
            f"ReadWriteOnce, kept), tokens of {len(tokens['manager-token'])} characters, distinct, "
            "checksum/secret hashes the rendered Secret; offline renders draw new tokens each time (no lookup)")


check("no-values install: one replica, embedded SQLite on a PersistentVolumeClaim, generated tokens", first_install)


class StubAPIServer:
    """Just enough of a Kubernetes API server for Helm's `lookup` of Secrets:
    discovery of v1 and GET of a Secret in the release namespace."""

    def __init__(self):
        self.secrets = {}
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = self.path.split("?")[0]
                prefix = f"/api/v1/namespaces/{NAMESPACE}/secrets/"
                if path == "/api/v1":
                    self.reply(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": [
                        {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
                         "verbs": ["get", "list"]}]})
                elif path.startswith(prefix) and path[len(prefix):] in stub.secrets:
                    self.reply(200, stub.secrets[path[len(prefix):]])
                else:
                    self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                     "code": 404, "message": f"{path} not found"})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def tokens_survive_upgrades():
    stub = StubAPIServer()
    try:
        with helm.Config(kube_apiserver=stub.url, kube_token="stub", namespace=NAMESPACE) as cfg, \
                helm.Chart.load(CHART) as chart:
            def release(values, **kind):
                texts = cfg.render(chart, values, name=RELEASE, namespace=NAMESPACE, **kind)
                docs = documents(texts)
                secret = one(docs, "Secret")
                annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
                return secret, secret_data(secret), annotations["checksum/secret"]

            secret, installed, checksum = release({}, is_install=True)
            stub.secrets[secret["metadata"]["name"]] = secret  # what the install created
            _, upgraded, checksum_after = release({}, is_upgrade=True)
            ensure(upgraded == installed, "an upgrade changed the generated tokens")
            ensure(checksum_after == checksum, "an upgrade changed checksum/secret: the pods would roll for nothing")
            _, to_postgres, _ = release({"database": {"url": "postgres://u:p@db/appproxy"}}, is_upgrade=True)
            ensure({k: to_postgres[k] for k in installed} == installed, "switching to PostgreSQL changed the tokens")
            rotated_token = "rotated-manager-token-0123456789abcdef"
            _, rotated, _ = release({"auth": {"managerToken": rotated_token}}, is_upgrade=True)
            ensure(rotated["manager-token"] == rotated_token and rotated["worker-token"] == installed["worker-token"],
                   "setting auth.managerToken did not replace just the manager token")
    finally:
        stub.close()
    return "install generates them; upgrade, and a switch to PostgreSQL, read them back via lookup (checksum/secret unchanged); auth.managerToken replaces only that token"


check("generated tokens survive upgrades (lookup against a stub API server)", tokens_survive_upgrades)


def backendai_secrets_survive_upgrades():
    stub = StubAPIServer()
    bai = {"backendai": {"enabled": True, "redisUrl": "redis://redis:6379/0"}}
    keys = ("backendai-api-secret", "backendai-jwt-secret")
    try:
        with helm.Config(kube_apiserver=stub.url, kube_token="stub", namespace=NAMESPACE) as cfg, \
                helm.Chart.load(CHART) as chart:
            def release(values, **kind):
                secret = one(documents(cfg.render(chart, values, name=RELEASE, namespace=NAMESPACE, **kind)), "Secret")
                stub.secrets[secret["metadata"]["name"]] = secret  # what the API server holds afterwards
                return secret_data(secret)

            installed = release(bai, is_install=True)
            ensure(all(installed.get(k) for k in keys), f"install rendered {sorted(installed)}")
            upgraded = release(bai, is_upgrade=True)
            ensure(upgraded == installed, "an upgrade changed the Backend.AI secrets")
            off = release({}, is_upgrade=True)
            ensure({k: off.get(k) for k in keys} == {k: installed[k] for k in keys},
                   "turning Backend.AI mode off dropped its secrets from the Secret")
            ensure("redis-url" not in off, "redis-url kept while Backend.AI mode is off")
            on_again = release(bai, is_upgrade=True)
            ensure(on_again == installed, "turning Backend.AI mode on again changed its secrets")
            given = "rotated-jwt-secret-0123456789abcdef"
            rotated = release(deep_merge(bai, {"backendai": {"jwtSecret": given}}), is_upgrade=True)
            ensure(rotated["backendai-jwt-secret"] == given and rotated["backendai-api-secret"] == installed["backendai-api-secret"]
                   and rotated["manager-token"] == installed["manager-token"],
                   "setting backendai.jwtSecret did not replace just that secret")
            stub.secrets.clear()
            late = release({}, is_install=True)
            ensure(not set(late) & set(keys), "Backend.AI secrets generated while the mode is off")
            enabled_later = release(bai, is_upgrade=True)
            ensure(all(enabled_later.get(k) for k in keys) and enabled_later["manager-token"] == late["manager-token"],
                   "turning Backend.AI mode on in an upgrade did not generate its secrets next to the kept tokens")
    finally:
        stub.close()
    return ("generated on install, read back by upgrades, carried over while the mode is off and used again when it is "
            "back on, replaced one by one when set; an upgrade that turns the mode on generates them, keeping the tokens")


check("generated Backend.AI secrets survive upgrades, also across turning the mode off and on", backendai_secrets_survive_upgrades)


def bad_values():
    values = load_values("ci/bad-values.yaml")
    try:
        render(values)
    except helm.HelmValuesError as e:
        message = str(e)
        ensure("replicaCount" in message, f"rejected, but not for replicaCount: {message}")
        return "rejected by values.schema.json: " + " ".join(message.split("\n")[-2:]).strip()
    except helm.HelmError as e:
        raise CheckFailed(f"rejected by a template, not by values.schema.json: {e}")
    raise CheckFailed("ci/bad-values.yaml rendered; values.schema.json must reject replicaCount: \"two\"")


check("schema rejects ci/bad-values.yaml (replicaCount: \"two\")", bad_values)


def tls_install():
    docs = rendered.get("tls")
    ensure(docs is not None, "the TLS render failed")
    secret_name = load_values(*tls)["tls"]["secretName"]
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container_of(dep)
    ensure(c["ports"] == [{"name": "https", "containerPort": 6030, "protocol": "TCP"}], f"ports {c['ports']}")
    volumes = {v["name"]: v for v in pod["volumes"]}
    tls_volumes = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret_name]
    ensure(len(tls_volumes) == 1, f"no volume of the Secret {secret_name}")
    items = {i["key"]: i["path"] for i in tls_volumes[0]["secret"].get("items", [])}
    ensure(items == {"tls.crt": "tls.crt", "tls.key": "tls.key"}, f"items {items}")
    ensure(tls_volumes[0]["secret"].get("defaultMode") == 0o440, "the key is readable by others")
    mount = [m for m in c["volumeMounts"] if m["name"] == tls_volumes[0]["name"]]
    ensure(len(mount) == 1 and mount[0].get("readOnly") is True, f"mount {mount}")
    env = {e["name"]: e.get("value") for e in c["env"]}
    directory = mount[0]["mountPath"]
    ensure(env.get("APPPROXY_TLS_CERT") == f"{directory}/tls.crt", f"APPPROXY_TLS_CERT {env.get('APPPROXY_TLS_CERT')}")
    ensure(env.get("APPPROXY_TLS_KEY") == f"{directory}/tls.key", f"APPPROXY_TLS_KEY {env.get('APPPROXY_TLS_KEY')}")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        ensure(get.get("scheme") == "HTTPS" and get.get("port") == "https", f"{probe}: {get}")
    svc_port = one(docs, "Service")["spec"]["ports"][0]
    ensure(svc_port["name"] == "https" and svc_port["targetPort"] == "https" and svc_port.get("appProtocol") == "https",
           f"Service port {svc_port}")
    endpoint = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    ensure(endpoint["port"] == "https" and endpoint["scheme"] == "https", f"ServiceMonitor endpoint {endpoint}")
    ensure(endpoint.get("tlsConfig") == load_values(*tls)["serviceMonitor"]["tlsConfig"], "ServiceMonitor tlsConfig")
    ingress_ports = one(docs, "NetworkPolicy")["spec"]["ingress"][0]["ports"]
    ensure(ingress_ports == [{"port": "https", "protocol": "TCP"}], f"NetworkPolicy ports {ingress_ports}")
    # The pod IP is not in the certificate: no peer URL unless one is given.
    ensure("APPPROXY_PEER_URL" not in env, f"APPPROXY_PEER_URL {env.get('APPPROXY_PEER_URL')} with TLS")
    for label in ("default", "postgres", "production"):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = container_of(one(rendered[label], "Deployment"))[probe]["httpGet"]
            ensure(get.get("scheme", "HTTP") == "HTTP", f"{label}: {probe} is {get.get('scheme')} without TLS")
    return (f"{secret_name} mounted read-only at {directory} (tls.crt, tls.key, mode 0440), APPPROXY_TLS_CERT/KEY set, "
            "probes, Service, ServiceMonitor and NetworkPolicy on https; plain HTTP without tls.secretName")


check("TLS install: the Secret mounted, the TLS flags set, everything on HTTPS", tls_install)


# The Backend.AI values: where each goes. The secrets are Secret keys read
# through secretKeyRef; the rest plain environment variables.
BACKENDAI_SECRET_ENV = {
    "APPPROXY_BACKENDAI_API_SECRET": "backendai-api-secret",
    "APPPROXY_BACKENDAI_JWT_SECRET": "backendai-jwt-secret",
    "APPPROXY_REDIS_URL": "redis-url",
}
BACKENDAI_PLAIN_ENV = {"APPPROXY_BACKENDAI_CONF_ALLOWED_NETWORKS", "APPPROXY_BACKENDAI_ACK_TIMEOUT",
                       "APPPROXY_BACKENDAI_IDLE_TIMEOUT", "APPPROXY_BACKENDAI_CORE_CLAIM_IDLE",
                       "APPPROXY_BACKENDAI_RESYNC_PERIOD", "APPPROXY_ADVERTISED_URL"}
# The Manager's core bus: from the Secret when it holds the key (optional).
BACKENDAI_OPTIONAL_SECRET_ENV = {"APPPROXY_BACKENDAI_CORE_REDIS_URL": "backendai-core-redis-url"}
BACKENDAI_ENV = set(BACKENDAI_SECRET_ENV) | BACKENDAI_PLAIN_ENV | set(BACKENDAI_OPTIONAL_SECRET_ENV) | {
    "APPPROXY_BACKENDAI_API_SECRET_FILE", "APPPROXY_BACKENDAI_JWT_SECRET_FILE"}


def no_secret_in_plain_text(label, docs, secrets):
    """No secret value appears in a plain env value, in the pod spec, or in a
    ConfigMap: only the Secret holds them."""
    for doc in find(docs, "Deployment") + find(docs, "ConfigMap"):
        text = json.dumps(doc)
        for key, value in secrets.items():
            ensure(value not in text, f"{label}: the value of {key} is in the {doc['kind']} {doc['metadata']['name']}")
    for e in container_of(one(docs, "Deployment"))["env"]:
        if e["name"] in BACKENDAI_SECRET_ENV or e["name"] in BACKENDAI_OPTIONAL_SECRET_ENV:
            ensure("value" not in e, f"{label}: {e['name']} is a plain value")


def status_page():
    viewer = "chart-check-viewer-token-0123456789"
    raw = render({"ui": {"enabled": False, "viewerToken": viewer}})
    ensure("/ui" not in raw["appproxy-coordinator/templates/NOTES.txt"], "NOTES.txt points at the status page when it is off")
    ensure("127.0.0.1:6030/ui" in render({})["appproxy-coordinator/templates/NOTES.txt"], "NOTES.txt does not point at the status page")
    docs = documents(raw)
    env = {e["name"]: e for e in container_of(one(docs, "Deployment"))["env"]}
    ensure(env["APPPROXY_UI"].get("value") == "false", f"APPPROXY_UI {env['APPPROXY_UI']}")
    tokens = secret_data(one(docs, "Secret"))
    ensure(tokens.get("viewer-token") == viewer, f"Secret keys {sorted(tokens)}")
    no_secret_in_plain_text("ui", docs, {"viewer-token": viewer})
    ensure("value" not in env["APPPROXY_VIEWER_TOKEN"], "APPPROXY_VIEWER_TOKEN is a plain value")
    return ("ui.enabled=false sets APPPROXY_UI=false (and NOTES.txt no longer points at /ui); "
            "ui.viewerToken goes into the Secret as viewer-token, nowhere in plain text")


check("status page: ui.enabled, ui.viewerToken in the Secret only", status_page)


def backendai_install():
    docs = rendered.get("backendai")
    ensure(docs is not None, "the Backend.AI render failed")
    values = load_values(*backendai)["backendai"]
    dep = one(docs, "Deployment")
    env = {e["name"]: e for e in container_of(dep)["env"]}
    secret = one(docs, "Secret")
    data = secret_data(secret)
    ensure(set(data) == {"manager-token", "worker-token", *BACKENDAI_SECRET_ENV.values(),
                         *BACKENDAI_OPTIONAL_SECRET_ENV.values()}, f"Secret keys {sorted(data)}")
    for key in ("backendai-api-secret", "backendai-jwt-secret"):
        ensure(len(data[key]) >= 32 and data[key].isalnum(), f"{key} is not a long random secret ({len(data[key])} characters)")
    ensure(len({data["backendai-api-secret"], data["backendai-jwt-secret"], data["manager-token"], data["worker-token"]}) == 4,
           "two of the generated secrets are equal")
    ensure(data["redis-url"] == values["redisUrl"], "redis-url is not backendai.redisUrl")
    ensure(data["backendai-core-redis-url"] == values["coreRedisUrl"], "backendai-core-redis-url is not backendai.coreRedisUrl")
    for var, key in BACKENDAI_SECRET_ENV.items():
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
        ensure(ref == {"name": FULLNAME, "key": key}, f"{var} from {ref}")
    for var, key in BACKENDAI_OPTIONAL_SECRET_ENV.items():
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
        ensure(ref == {"name": FULLNAME, "key": key, "optional": True}, f"{var} from {ref}")
    no_secret_in_plain_text("backendai", docs, {k: v for k, v in data.items()})
    for url in (values["redisUrl"], values["coreRedisUrl"]):
        password = url.split("://", 1)[1].split("@")[0].lstrip(":")
        no_secret_in_plain_text("backendai", docs, {"a Redis password": password})
    plain = {name: env.get(name, {}).get("value") for name in BACKENDAI_PLAIN_ENV}
    expected = {
        "APPPROXY_BACKENDAI_CONF_ALLOWED_NETWORKS": ",".join(values["confAllowedNetworks"]),
        "APPPROXY_BACKENDAI_ACK_TIMEOUT": values["ackTimeout"],
        "APPPROXY_BACKENDAI_IDLE_TIMEOUT": values["idleTimeout"],
        "APPPROXY_BACKENDAI_CORE_CLAIM_IDLE": values["coreClaimIdle"],
        "APPPROXY_BACKENDAI_RESYNC_PERIOD": values["resyncPeriod"],
        "APPPROXY_ADVERTISED_URL": values["advertisedUrl"],
    }
    ensure(plain == expected, f"plain env {plain}, expected {expected}")
    ports = one(docs, "Service")["spec"]["ports"]
    ensure(ports[0]["name"] == "http" and ports[0]["port"] == 6030, f"first Service port {ports[0]}")
    ensure(ports[1:] == [{"name": "backendai", "port": values["servicePort"], "targetPort": "http", "protocol": "TCP",
                          "appProtocol": "http"}], f"backendai Service port {ports[1:]}")
    notes = raw["backendai"]["appproxy-coordinator/templates/NOTES.txt"]
    ensure("Backend.AI mode" in notes and values["advertisedUrl"] in notes, "NOTES.txt says nothing of Backend.AI mode")
    # Off by default: nothing of it anywhere.
    for label in CONFIGURATIONS:
        if label in BACKENDAI_LABELS:
            continue
        d = rendered.get(label)
        ensure(d is not None, f"the {label} render failed")
        names = {e["name"] for e in container_of(one(d, "Deployment"))["env"]}
        ensure(not names & BACKENDAI_ENV, f"{label}: {sorted(names & BACKENDAI_ENV)} set without backendai.enabled")
        ensure(len(one(d, "Service")["spec"]["ports"]) == 1, f"{label}: a second Service port without backendai.enabled")
        for s in find(d, "Secret"):
            keys = set(BACKENDAI_SECRET_ENV.values()) | set(BACKENDAI_OPTIONAL_SECRET_ENV.values())
            ensure(not set(s.get("data", {})) & keys, f"{label}: Backend.AI keys in the Secret")
        ensure("Backend.AI mode" not in raw[label]["appproxy-coordinator/templates/NOTES.txt"], f"{label}: NOTES.txt speaks of Backend.AI")
    # The least Backend.AI install: the Service's in-cluster URL advertised, no
    # token-less networks (and NOTES.txt warns about both).
    minimal = render({"backendai": {"enabled": True, "redisUrl": "redis://redis:6379"}})
    mdocs = documents(minimal)
    menv = {e["name"]: e for e in container_of(one(mdocs, "Deployment"))["env"]}
    in_cluster = f"http://{FULLNAME}.{NAMESPACE}.svc:6030"
    ensure(menv["APPPROXY_ADVERTISED_URL"].get("value") == in_cluster, f"default advertised URL {menv['APPPROXY_ADVERTISED_URL']}")
    ensure("APPPROXY_BACKENDAI_CONF_ALLOWED_NETWORKS" not in menv, "APPPROXY_BACKENDAI_CONF_ALLOWED_NETWORKS set for an empty list")
    ensure(menv["APPPROXY_BACKENDAI_ACK_TIMEOUT"].get("value") == "15s" and menv["APPPROXY_BACKENDAI_IDLE_TIMEOUT"].get("value") == "1h",
           "default timeouts are not 15s and 1h")
    ensure(menv["APPPROXY_BACKENDAI_CORE_CLAIM_IDLE"].get("value") == "5m", "the default core claim idle is not 5m")
    ensure(menv["APPPROXY_BACKENDAI_RESYNC_PERIOD"].get("value") == "5m", "the default resync period is not 5m")
    ensure("backendai-core-redis-url" not in secret_data(one(mdocs, "Secret")),
           "a core Redis URL in the Secret without backendai.coreRedisUrl (the default: redisUrl with DB 4)")
    ensure(len(one(mdocs, "Service")["spec"]["ports"]) == 1, "a second Service port without backendai.servicePort")
    mnotes = minimal["appproxy-coordinator/templates/NOTES.txt"]
    ensure("backendai.advertisedUrl" in mnotes and "confAllowedNetworks is empty" in mnotes,
           "NOTES.txt does not warn about the in-cluster URL and the empty confAllowedNetworks")
    # existingSecret: the same keys, read from the user's Secret.
    existing = documents(render({"existingSecret": "creds", "backendai": {"enabled": True}}))
    ensure(not find(existing, "Secret"), "a Secret rendered although existingSecret is set")
    eenv = {e["name"]: e for e in container_of(one(existing, "Deployment"))["env"]}
    for var, key in BACKENDAI_SECRET_ENV.items():
        ref = eenv.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
        ensure(ref == {"name": "creds", "key": key}, f"existingSecret: {var} from {ref}")
    return ("backendai-api-secret, backendai-jwt-secret (generated, 48 characters, distinct) and redis-url in the Secret, "
            "read by secretKeyRef; no secret (nor the Redis password) in env values, the pod spec or the ConfigMap; "
            "networks, timeouts and advertised URL as plain env; Service port 10200 -> http; none of it when disabled; "
            f"default advertised URL {in_cluster}; with existingSecret the same keys from the user's Secret")


check("Backend.AI install: secrets in the Secret only, plain env for the rest, the upstream port", backendai_install)


def backendai_sentinel_and_discovery():
    values = {"backendai": {
        "enabled": True,
        "redisSentinel": ["sentinel-0.redis:26379", "sentinel-1.redis:26379"],
        "redisServiceName": "mymaster",
        "coreRedisSentinel": ["core-sentinel.backendai:26379"],
        "coreRedisServiceName": "core",
        "serviceDiscovery": {"enabled": True},
    }}
    docs = documents(render(values))
    entries = container_of(one(docs, "Deployment"))["env"]
    env = {e["name"]: e for e in entries}
    want = {
        "APPPROXY_REDIS_SENTINEL": "sentinel-0.redis:26379,sentinel-1.redis:26379",
        "APPPROXY_REDIS_SERVICE_NAME": "mymaster",
        "APPPROXY_BACKENDAI_CORE_REDIS_SENTINEL": "core-sentinel.backendai:26379",
        "APPPROXY_BACKENDAI_CORE_REDIS_SERVICE_NAME": "core",
        "APPPROXY_ANNOUNCE_ADDR": "$(POD_IP):6030",
        "APPPROXY_ANNOUNCE_INTERVAL": "60s",
    }
    got = {k: env.get(k, {}).get("value") for k in want}
    ensure(got == want, f"env {got}, expected {want}")
    ensure(env["POD_IP"].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP", "POD_IP")
    names = [e["name"] for e in entries]
    ensure(names.index("POD_IP") < names.index("APPPROXY_ANNOUNCE_ADDR"), "POD_IP must come before $(POD_IP) uses it")
    # The coordinator takes them as the kubelet passes them (redis-url empty
    # in the Secret, $(POD_IP) expanded).
    redis_url = secret_data(one(docs, "Secret"))["redis-url"]
    ensure(redis_url == "", f"redis-url {redis_url!r} without backendai.redisUrl")
    cenv = {k: v for k, v in os.environ.items() if not k.startswith("APPPROXY_")}
    cenv.update({**want, "APPPROXY_REDIS_URL": redis_url, "APPPROXY_ANNOUNCE_ADDR": "10.244.1.7:6030"})
    out = subprocess.run([COORDINATOR_BIN, "config"], env=cenv, capture_output=True, text=True, timeout=60)
    ensure(out.returncode == 0, f"the coordinator refuses the rendered settings: {out.stderr.strip()}")
    ensure('announce_addr = "10.244.1.7:6030"' in out.stdout and "sentinel-0.redis:26379" in out.stdout
           and "redis_url" not in out.stdout, f"config: {out.stdout}")
    off = {e["name"] for e in container_of(one(documents(render({"backendai": {"enabled": True, "redisUrl": "redis://r:6379"}})), "Deployment"))["env"]}
    ensure(not off & {*want}, f"set by default: {sorted(off & {*want})}")
    r1 = expect_rejected({"backendai": {"enabled": True, "redisSentinel": ["s:26379"]}}, "redisServiceName")
    r2 = expect_rejected({"backendai": {"enabled": True, "redisSentinel": ["no-port"], "redisServiceName": "m"}},
                         "redisSentinel", by_schema=True)
    return ("APPPROXY_REDIS_SENTINEL, _SERVICE_NAME, the core bus's and APPPROXY_ANNOUNCE_ADDR=$(POD_IP):6030 as "
            f"plain env, accepted by the coordinator, none by default; sentinels without a service name {r1}; "
            f"a sentinel without a port {r2}")


check("Backend.AI Redis Sentinel and service discovery values", backendai_sentinel_and_discovery)


# TLS to the backing stores: where each file is mounted, which variable
# points at it.
DB_TLS_DIR, REDIS_TLS_DIR = "/etc/appproxy-db-tls", "/etc/appproxy-redis-tls"
STORE_TLS_ENV = {"PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "APPPROXY_REDIS_CA_FILE",
                 "APPPROXY_REDIS_CLIENT_CERT", "APPPROXY_REDIS_CLIENT_KEY"}


def store_tls_install():
    docs = rendered.get("storetls")
    ensure(docs is not None, "the store TLS render failed")
    values = load_values(*store_tls)
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container_of(dep)
    env = {e["name"]: e.get("value") for e in c["env"]}
    expected_env = {
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": f"{DB_TLS_DIR}/ca.crt",
        "PGSSLCERT": f"{DB_TLS_DIR}/tls.crt",
        "PGSSLKEY": f"{DB_TLS_DIR}/tls.key",
        "APPPROXY_REDIS_CA_FILE": f"{REDIS_TLS_DIR}/ca.crt",
    }
    got = {k: env[k] for k in STORE_TLS_ENV if k in env}
    ensure(got == expected_env, f"TLS env {got}, expected {expected_env}")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    db, redis = values["database"]["tls"], values["backendai"]["redisTls"]
    expected_sources = {
        DB_TLS_DIR: [
            {"configMap": {"name": db["caConfigMap"], "items": [{"key": db["caKey"], "path": "ca.crt"}]}},
            {"secret": {"name": db["clientSecret"], "items": [{"key": "tls.crt", "path": "tls.crt"},
                                                              {"key": "tls.key", "path": "tls.key"}]}},
        ],
        REDIS_TLS_DIR: [{"secret": {"name": redis["caSecret"], "items": [{"key": "ca.crt", "path": "ca.crt"}]}}],
    }
    for directory, sources in expected_sources.items():
        mount = mounts.get(directory)
        ensure(mount is not None and mount.get("readOnly") is True, f"{directory} mount {mount}")
        projected = volumes[mount["name"]].get("projected", {})
        ensure(projected.get("sources") == sources, f"{directory}: sources {projected.get('sources')}, expected {sources}")
        ensure(projected.get("defaultMode") == 0o440, f"{directory}: readable by others")
    for var, path in expected_env.items():
        if path.startswith("/"):
            ensure(os.path.dirname(path) in mounts, f"{var} points outside its mount: {path}")
    # The Redis URL (rediss://, with its password) stays in the Secret.
    data = secret_data(one(docs, "Secret"))
    ensure(data["redis-url"] == values["backendai"]["redisUrl"], "redis-url is not backendai.redisUrl")
    no_secret_in_plain_text("storetls", docs, {"the Redis password": "chart-check-redis-password"})
    # Nothing of it elsewhere.
    for label in CONFIGURATIONS:
        if label == "storetls":
            continue
        c = container_of(one(rendered[label], "Deployment"))
        names = {e["name"] for e in c["env"]} & STORE_TLS_ENV
        ensure(not names, f"{label}: {sorted(names)} set without database.tls or backendai.redisTls")
        paths = {m["mountPath"] for m in c["volumeMounts"]} & {DB_TLS_DIR, REDIS_TLS_DIR}
        ensure(not paths, f"{label}: {sorted(paths)} mounted without TLS to the stores")
    # A mode without a CA is passed alone; a CA from a Secret with the mode given.
    base = load_values(*postgres)
    mode_only = container_of(one(documents(render(deep_merge(base, {"database": {"tls": {"sslMode": "require"}}}))),
                                 "Deployment"))
    menv = {e["name"]: e.get("value") for e in mode_only["env"]}
    ensure({k: menv[k] for k in STORE_TLS_ENV if k in menv} == {"PGSSLMODE": "require"}, f"sslMode alone: {menv}")
    ensure(DB_TLS_DIR not in {m["mountPath"] for m in mode_only["volumeMounts"]}, "a TLS volume without files")
    ca_secret = documents(render(deep_merge(base, {"database": {"tls": {"sslMode": "verify-ca", "caSecret": "pg-ca"}}})))
    validate_all(ca_secret)
    cdep = one(ca_secret, "Deployment")
    cenv = {e["name"]: e.get("value") for e in container_of(cdep)["env"]}
    ensure(cenv.get("PGSSLMODE") == "verify-ca" and cenv.get("PGSSLROOTCERT") == f"{DB_TLS_DIR}/ca.crt", f"verify-ca: {cenv}")
    sources = [v for v in cdep["spec"]["template"]["spec"]["volumes"] if v["name"] == "database-tls"][0]["projected"]["sources"]
    ensure(sources == [{"secret": {"name": "pg-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}], f"caSecret sources {sources}")
    return (f"{DB_TLS_DIR} (CA from a ConfigMap, client certificate) and {REDIS_TLS_DIR} (CA from a Secret) projected "
            "read-only, mode 0440; PGSSLMODE verify-full with a CA, PGSSLROOTCERT/PGSSLCERT/PGSSLKEY and "
            "APPPROXY_REDIS_CA_FILE into them; rediss:// URL only in the Secret; none of it elsewhere; "
            "an sslMode alone and a CA from a Secret render as expected")


check("TLS to the stores: CAs and client certificate mounted, PGSSL* and APPPROXY_REDIS_* set", store_tls_install)


def rejections():
    base = load_values(*postgres)
    cases = [
        ("replicaCount 2 without a database (schema)", {"replicaCount": 2}, ["/replicaCount", "maximum"]),
        ("unknown key", deep_merge(base, {"replicas": 2}), ["additional properties", "replicas"]),
        ("unknown nested key", deep_merge(base, {"config": {"bnid": "0.0.0.0:1"}}), ["additional properties", "bnid"]),
        ("pod label overriding a selector label",
         deep_merge(base, {"podLabels": {"app.kubernetes.io/name": "x"}}), ["app.kubernetes.io/name"]),
        ("replicaCount 0", deep_merge(base, {"replicaCount": 0}), ["replicaCount"]),
        ("non-postgres URL", deep_merge(base, {"database": {"url": "sqlite://data/x.db"}}), ["database"]),
        ("short token", deep_merge(base, {"auth": {"managerToken": "short"}}), ["managerToken"]),
        ("short viewer token (schema)", {"ui": {"viewerToken": "short"}}, ["/ui/viewerToken"]),
        ("existingSecret and ui.viewerToken",
         {"existingSecret": "creds", "ui": {"viewerToken": "0123456789abcdef-viewer"}}, ["ui.viewerToken"]),
        ("equal tokens", deep_merge(base, {"auth": {"workerToken": base["auth"]["managerToken"]}}), ["must differ"]),
        ("existingSecret and inline values", deep_merge(base, {"existingSecret": "creds"}), ["existingSecret is set"]),
        ("grace period <= shutdown timeout",
         deep_merge(base, {"terminationGracePeriodSeconds": 20}), ["terminationGracePeriodSeconds"]),
        ("grace period <= preStop + shutdown",
         deep_merge(base, {"preStopSleepSeconds": 15}), ["terminationGracePeriodSeconds"]),
        ("Backend.AI without redisUrl (schema)", {"backendai": {"enabled": True}}, ["/backendai/redisUrl", "minLength"]),
        ("Backend.AI short apiSecret (schema)", {"backendai": {"enabled": True, "redisUrl": "redis://r:6379", "apiSecret": "short"}},
         ["/backendai/apiSecret"]),
        ("Backend.AI network without a prefix length (schema)",
         {"backendai": {"enabled": True, "redisUrl": "redis://r:6379", "confAllowedNetworks": ["10.0.0.1"]}},
         ["/backendai/confAllowedNetworks/0"]),
        ("Backend.AI timeout without a unit (schema)",
         {"backendai": {"enabled": True, "redisUrl": "redis://r:6379", "ackTimeout": "15"}}, ["/backendai/ackTimeout"]),
        ("Backend.AI non-Redis URL (schema)", {"backendai": {"enabled": True, "redisUrl": "http://r:6379"}}, ["/backendai/redisUrl"]),
        ("database.tls with a CA from a Secret and a ConfigMap (schema)",
         deep_merge(base, {"database": {"tls": {"caSecret": "a", "caConfigMap": "b"}}}), ["/database/tls/caConfigMap"]),
        ("database.tls unknown sslMode (schema)",
         deep_merge(base, {"database": {"tls": {"sslMode": "verify_full"}}}), ["/database/tls/sslMode"]),
        ("database.tls on the embedded SQLite database", {"database": {"tls": {"caSecret": "pg-ca"}}},
         ["database.tls is for PostgreSQL"]),
        ("backendai.redisTls with a redis:// URL",
         {"backendai": {"enabled": True, "redisUrl": "redis://r:6379", "redisTls": {"caSecret": "redis-ca"}}},
         ["needs a rediss://"]),
        ("backendai.redisTls with a CA from a Secret and a ConfigMap (schema)",
         {"backendai": {"enabled": True, "redisUrl": "rediss://r:6379", "redisTls": {"caSecret": "a", "caConfigMap": "b"}}},
         ["/backendai/redisTls/caConfigMap"]),
        ("a TLS variable in extraEnv (schema)",
         {"extraEnv": [{"name": "PGSSLMODE", "value": "disable"}]}, ["/extraEnv/0/name"]),
        ("Backend.AI unknown key (schema)", {"backendai": {"enabled": True, "redisUrl": "redis://r:6379", "apiKey": "x"}},
         ["additional properties", "apiKey"]),
        ("a Backend.AI secret in extraEnv (schema)",
         {"extraEnv": [{"name": "APPPROXY_BACKENDAI_API_SECRET", "value": "plain-text-secret-0123456789"}]}, ["/extraEnv/0/name"]),
        ("the Redis URL in extraEnv (schema)",
         {"extraEnv": [{"name": "APPPROXY_REDIS_URL", "value": "redis://:password@r:6379"}]}, ["/extraEnv/0/name"]),
        ("existingSecret and backendai.redisUrl",
         {"existingSecret": "creds", "backendai": {"enabled": True, "redisUrl": "redis://r:6379"}}, ["existingSecret is set", "redisUrl"]),
        ("backendai.servicePort = service.port",
         {"backendai": {"enabled": True, "redisUrl": "redis://r:6379", "servicePort": 6030}}, ["backendai.servicePort"]),
    ]
    for label, values, needles in cases:
        try:
            expect_rejected(values, *needles, by_schema="(schema)" in label)
        except CheckFailed as e:
            raise CheckFailed(f"{label}: {e}")
    # The same with schema validation skipped (`helm install --skip-schema-validation`):
    # the templates refuse it too, in a sentence.
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, os.path.basename(CHART))
        shutil.copytree(CHART, copy)
        os.remove(os.path.join(copy, "values.schema.json"))
        try:
            expect_rejected({"replicaCount": 2}, "set database.url (PostgreSQL) or existingSecret", chart_dir=copy)
        except CheckFailed as e:
            raise CheckFailed(f"replicaCount 2 without a database, schema skipped: {e}")
        try:
            expect_rejected({"backendai": {"enabled": True}}, "backendai.enabled needs backendai.redisUrl", chart_dir=copy)
        except CheckFailed as e:
            raise CheckFailed(f"Backend.AI without redisUrl, schema skipped: {e}")
        try:
            expect_rejected(deep_merge(base, {"database": {"tls": {"caSecret": "a", "caConfigMap": "b"}}}),
                            "set caSecret or caConfigMap, not both", chart_dir=copy)
        except CheckFailed as e:
            raise CheckFailed(f"database.tls with two CAs, schema skipped: {e}")
    return (f"{len(cases) + 3} cases: " + ", ".join(label for label, _, _ in cases)
            + "; replicaCount 2, Backend.AI without redisUrl and two database CAs again without the schema")


check("chart rejects invalid values with a clear message", rejections)


def rbac():
    for label in CONFIGURATIONS:
        docs = rendered.get(label)
        ensure(docs is not None, f"the {label} render failed")
        ensure(not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding"), "cluster-wide RBAC rendered")
        role = one(docs, "Role")
        granted = {}
        for rule in role["rules"]:
            ensure(not rule.get("resourceNames") and not rule.get("nonResourceURLs"), f"unexpected rule {rule}")
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
        for key, verbs in granted.items():
            ensure("*" not in verbs and "*" not in key, f"wildcard in {key}: {sorted(verbs)}")
        extra = {k: sorted(v - EXPECTED_RBAC.get(k, set())) for k, v in granted.items() if v - EXPECTED_RBAC.get(k, set())}
        missing = {k: sorted(v - granted.get(k, set())) for k, v in EXPECTED_RBAC.items() if v - granted.get(k, set())}
        ensure(not extra, f"grants more than the coordinator calls: {extra}")
        ensure(not missing, f"lacks what the coordinator calls: {missing}")
        binding = one(docs, "RoleBinding")
        sa = one(docs, "ServiceAccount")["metadata"]["name"]
        ensure(binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]},
               f"RoleBinding refers to {binding['roleRef']}")
        ensure(binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}],
               f"RoleBinding subjects {binding['subjects']}")
    n = sum(len(v) for v in EXPECTED_RBAC.values())
    return f"namespaced Role, {len(EXPECTED_RBAC)} resources, {n} verbs, bound to the chart's ServiceAccount"


check("RBAC grants exactly the expected resources and verbs", rbac)


def deployment_properties():
    for label, replicas, secret in (("default", 1, FULLNAME), ("postgres", 2, FULLNAME),
                                    ("production", 3, "appproxy-coordinator-credentials")):
        docs = rendered.get(label)
        ensure(docs is not None, f"the {label} render failed")
        dep = one(docs, "Deployment")
        pod = dep["spec"]["template"]["spec"]
        c = container_of(dep)
        where = f"{label}: "
        ensure(dep["spec"]["replicas"] == replicas, where + f"replicas {dep['spec']['replicas']}")
        psc, csc = pod["securityContext"], c["securityContext"]
        ensure(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001, where + f"pod securityContext {psc}")
        ensure(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where + "pod seccomp")
        ensure(csc.get("runAsNonRoot") is True and csc.get("runAsUser") == 10001, where + f"container securityContext {csc}")
        ensure(csc.get("readOnlyRootFilesystem") is True, where + "root filesystem is writable")
        ensure(csc.get("allowPrivilegeEscalation") is False, where + "privilege escalation allowed")
        ensure(csc.get("capabilities", {}).get("drop") == ["ALL"], where + f"capabilities {csc.get('capabilities')}")
        ensure(csc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where + "container seccomp")
        ensure(c["ports"] == [{"name": "http", "containerPort": 6030, "protocol": "TCP"}], where + f"ports {c['ports']}")
        ensure(c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}, where + "liveness probe")
        ensure(c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, where + "readiness probe")
        ensure(c["args"] == ["serve", "--config", "/etc/appproxy/config.toml"], where + f"args {c['args']}")
        env = {e["name"]: e for e in c["env"]}
        ensure(env["APPPROXY_BIND"].get("value") == "0.0.0.0:6030", where + "APPPROXY_BIND")
        ensure(env["APPPROXY_DATA_DIR"].get("value") == "/data", where + "APPPROXY_DATA_DIR")
        ensure(env["APPPROXY_LOG_FORMAT"].get("value") == "json", where + "APPPROXY_LOG_FORMAT")
        ensure(env["APPPROXY_SHUTDOWN_TIMEOUT"].get("value") == "20s", where + "APPPROXY_SHUTDOWN_TIMEOUT")
        sqlite = label == "default"
        for var, key in (("APPPROXY_DATABASE_URL", "database-url"), ("APPPROXY_MANAGER_TOKEN", "manager-token"),
                         ("APPPROXY_WORKER_TOKEN", "worker-token")):
            if sqlite and var == "APPPROXY_DATABASE_URL":
                continue
            ref = env[var].get("valueFrom", {}).get("secretKeyRef")
            ensure(ref == {"name": secret, "key": key}, where + f"{var} from {ref}")
        if not sqlite:
            ensure(dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                   where + f"strategy {dep['spec']['strategy']}")
            ensure(not find(docs, "PersistentVolumeClaim"), where + "a PersistentVolumeClaim rendered on PostgreSQL")
        for var, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
            ensure(env[var].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == field, where + var)
        shutdown = int(env["APPPROXY_SHUTDOWN_TIMEOUT"]["value"].rstrip("s"))
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = pod["terminationGracePeriodSeconds"]
        ensure(grace > pre_stop + shutdown, where + f"grace {grace}s <= preStop {pre_stop}s + shutdown {shutdown}s")
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        ensure(("persistentVolumeClaim" if sqlite else "emptyDir") in volumes[mounts["/data"]], where + f"/data is {volumes[mounts['/data']]}")
        ensure(volumes[mounts["/etc/appproxy"]]["configMap"]["name"] == FULLNAME, where + "config volume")
        annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
        ensure(len(annotations.get("checksum/config", "")) == 64, where + "no checksum/config annotation")
        ensure(("checksum/secret" in annotations) == (secret == FULLNAME), where + "checksum/secret annotation")
        ensure(resources_set(c), where + "no resource requests/limits")
        secrets = find(docs, "Secret")
        if secret == FULLNAME:
            keys = {"manager-token", "worker-token"} | (set() if sqlite else {"database-url"})
            ensure(len(secrets) == 1 and set(secrets[0]["data"]) == keys, where + "chart Secret keys")
        else:
            ensure(not secrets, where + "a Secret was rendered although existingSecret is set")
        svc = one(docs, "Service")
        ensure(svc["spec"]["type"] == "ClusterIP", where + "Service type")
        ensure(svc["spec"]["ports"][0]["name"] == "http" and svc["spec"]["ports"][0]["port"] == 6030, where + "Service port")
        pdb = one(docs, "PodDisruptionBudget")["spec"]
        expected_pdb = {"minAvailable": 1} if replicas > 1 else {"maxUnavailable": 1}
        ensure({k: v for k, v in pdb.items() if k != "selector"} == expected_pdb, where + f"PDB {pdb}")
        ensure(pdb["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"], where + "PDB selector")
    # Production only: the optional resources.
    docs = rendered["production"]
    sm = one(docs, "ServiceMonitor")
    ensure(sm["spec"]["endpoints"][0]["port"] == "http" and sm["spec"]["endpoints"][0]["path"] == "/metrics",
           "ServiceMonitor endpoint")
    svc_labels = one(docs, "Service")["metadata"]["labels"]
    ensure(all(svc_labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()),
           "ServiceMonitor selector does not match the Service")
    np = one(docs, "NetworkPolicy")["spec"]
    ensure(np["policyTypes"] == ["Ingress", "Egress"], f"NetworkPolicy policyTypes {np['policyTypes']}")
    ensure(np["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}], "NetworkPolicy ingress port")
    # The replicas reach each other (the leader takes the others' creates).
    selector = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    ensure(np["ingress"][-1] == {"ports": [{"port": "http", "protocol": "TCP"}],
                                 "from": [{"podSelector": {"matchLabels": selector}}]},
           f"NetworkPolicy: the replicas do not reach each other: {np['ingress'][-1]}")
    ensure(np["egress"][-1] == {"ports": [{"port": 6030, "protocol": "TCP"}],
                                "to": [{"podSelector": {"matchLabels": selector}}]},
           f"NetworkPolicy: no egress to the other replicas: {np['egress'][-1]}")
    entries = container_of(one(docs, "Deployment"))["env"]
    names = [e["name"] for e in entries]
    peer = {e["name"]: e.get("value") for e in entries}.get("APPPROXY_PEER_URL")
    ensure(peer == "http://$(POD_IP):6030" and names.index("POD_IP") < names.index("APPPROXY_PEER_URL"),
           f"APPPROXY_PEER_URL {peer} (after POD_IP)")
    ensure(not find(rendered["default"], "ServiceMonitor") and not find(rendered["default"], "NetworkPolicy"),
           "ServiceMonitor/NetworkPolicy rendered although disabled by default")
    return ("security context, probes, env from Secret, grace > preStop + shutdown, PDB, ServiceMonitor, "
            "NetworkPolicy (the replicas reach each other), APPPROXY_PEER_URL=http://$(POD_IP):6030")


def resources_set(c):
    r = c.get("resources", {})
    return bool(r.get("requests")) and bool(r.get("limits", {}).get("memory"))


check("Deployment and companions keep their production properties", deployment_properties)




# ---------------------------------------------------------------------------
# The coordinator binary, run as the rendered pods would run it.

def coordinator_help():
    ensure(COORDINATOR_BIN and os.access(COORDINATOR_BIN, os.X_OK), f"no coordinator binary at {COORDINATOR_BIN!r}")
    out = subprocess.run([COORDINATOR_BIN, "--help"], capture_output=True, text=True, timeout=60)
    ensure(out.returncode == 0, f"{COORDINATOR_BIN} --help: {out.stderr.strip()}")
    return out.stdout


def env_names_known():
    """Every APPPROXY_* variable a Deployment sets is one the binary reads
    (clap lists each flag's variable in --help as [env: NAME=...])."""
    help_text = coordinator_help()
    seen = set()
    for label in CONFIGURATIONS:
        ensure(label in rendered, f"the {label} render failed")
        for e in container_of(one(rendered[label], "Deployment"))["env"]:
            if e["name"].startswith("APPPROXY_"):
                # [env: NAME=] or, for secrets (hide_env_values), [env: NAME]
                ensure(f"[env: {e['name']}=" in help_text or f"[env: {e['name']}]" in help_text,
                       f"{label}: {e['name']} is not read by the coordinator")
                seen.add(e["name"])
    return f"{', '.join(sorted(seen))} listed by {COORDINATOR_BIN} --help"


check("every APPPROXY_* variable the Deployments set is one the coordinator reads", env_names_known)


def config_toml():
    docs = rendered.get("default")
    ensure(docs is not None, "the default render failed")
    text = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"] == FULLNAME][0]["data"]["config.toml"]
    parsed = tomllib.loads(text)
    unknown = set(parsed) - CONFIG_KEYS
    ensure(not unknown, f"config.toml has keys the coordinator does not know: {sorted(unknown)}")
    coordinator_help()  # the binary is there
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.toml")
        with open(path, "w") as fh:
            fh.write(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPPROXY_")}
        out = subprocess.run([COORDINATOR_BIN, "config", "--config", path], env=env,
                             capture_output=True, text=True, timeout=60)
        ensure(out.returncode == 0, f"{COORDINATOR_BIN} rejects it: {out.stderr.strip() or out.stdout.strip()}")
        effective = tomllib.loads(out.stdout)
        for key in parsed:
            ensure(effective.get(key) == parsed[key], f"{key}: the coordinator read {effective.get(key)!r}, not {parsed[key]!r}")
    return f"accepted by {COORDINATOR_BIN} config --config"


check("config.toml is one the coordinator accepts", config_toml)


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Pod:
    """The coordinator started as a rendered Deployment's pod would start it:
    the container's args and env, its ConfigMap and Secret volumes as files,
    emptyDir and PersistentVolumeClaim volumes as directories under workdir
    (kept, so a second Pod on the same workdir is a restart on the same
    volume). Only the listen address changes: 127.0.0.1 and a free port.
    `secrets` stands in for Secrets the chart does not render."""

    def __init__(self, label, workdir, secrets=None):
        self.label = label
        self.docs = rendered[label]
        dep = one(self.docs, "Deployment")
        spec = dep["spec"]["template"]["spec"]
        self.container = c = container_of(dep)
        self.grace = spec["terminationGracePeriodSeconds"]
        self.secrets = secrets or {}
        ensure(len(c["ports"]) == 1, f"ports {c['ports']}")
        self.port_name, container_port = c["ports"][0]["name"], c["ports"][0]["containerPort"]
        self.port = free_port()
        volumes = {v["name"]: v for v in spec["volumes"]}
        self.mounts = {}
        for m in c["volumeMounts"]:
            volume = volumes[m["name"]]
            local = os.path.join(workdir, "volumes", m["name"])
            if not os.path.isdir(local):
                os.makedirs(local, mode=0o700)
                if "configMap" in volume:
                    files = {k: v.encode() for k, v in self.named("ConfigMap", volume["configMap"]["name"])["data"].items()}
                elif "secret" in volume:
                    data = self.secret(volume["secret"]["secretName"])
                    items = volume["secret"].get("items")
                    files = {i["path"]: data[i["key"]] for i in items} if items else data
                elif "emptyDir" in volume or "persistentVolumeClaim" in volume:
                    files = {}
                else:
                    raise CheckFailed(f"cannot stand in for the volume {volume}")
                for name, content in files.items():
                    with open(os.path.join(local, name), "wb") as fh:
                        fh.write(content)
            self.mounts[m["mountPath"]] = local
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_LOG": "warn"}
        for e in c["env"]:
            if "value" in e:
                # $(NAME) of a variable defined before, as the kubelet expands it.
                value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                               lambda m: self.env.get(m.group(1), m.group(0)), self.local(e["value"]))
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                data = self.secret(ref["name"])
                if ref.get("optional") and ref["key"] not in data:
                    continue  # as Kubernetes does: an optional key that is absent sets nothing
                value = data[ref["key"]].decode()
            elif "fieldRef" in e.get("valueFrom", {}):
                value = {"metadata.name": f"{FULLNAME}-0", "metadata.namespace": NAMESPACE,
                         "status.podIP": "127.0.0.1"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                raise CheckFailed(f"cannot stand in for the variable {e}")
            self.env[e["name"]] = value
        ensure(self.env.get("APPPROXY_BIND") == f"0.0.0.0:{container_port}", f"APPPROXY_BIND {self.env.get('APPPROXY_BIND')}")
        self.env["APPPROXY_BIND"] = f"127.0.0.1:{self.port}"
        self.args = [self.local(a) for a in c.get("args", [])]
        self.log_path = os.path.join(workdir, "coordinator.log")
        self.process = None
        self.ca_file = None

    def named(self, kind, name):
        found = [d for d in find(self.docs, kind) if d["metadata"]["name"] == name]
        ensure(len(found) == 1, f"no {kind} {name} rendered")
        return found[0]

    def secret(self, name):
        if name in self.secrets:
            return self.secrets[name]
        return {k: base64.b64decode(v) for k, v in self.named("Secret", name).get("data", {}).items()}

    def local(self, value):
        """A path inside a volume mount, moved to the mount's directory."""
        for mount in sorted(self.mounts, key=len, reverse=True):
            if value == mount or value.startswith(mount + "/"):
                return self.mounts[mount] + value[len(mount):]
        return value

    def volume_dir(self, mount_path):
        return self.mounts[mount_path]

    def url(self, path, scheme=None):
        scheme = (scheme or self.port_name).lower()
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def request(self, method, path, token=None, body=None, scheme=None, timeout=10, stream=False):
        import ssl
        import urllib.request
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url(path, scheme), data=data, headers=headers, method=method)
        context = ssl.create_default_context(cafile=self.ca_file) if self.url(path, scheme).startswith("https") else None
        try:
            response = urllib.request.urlopen(req, timeout=timeout, context=context)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        if stream:
            return response.status, response
        with response:
            return response.status, response.read().decode()

    def call(self, method, path, token=None, body=None, expect=(200, 201)):
        status, text = self.request(method, path, token, body)
        ensure(status in expect, f"{method} {path} answered {status}: {text[:300]}")
        return json.loads(text) if text.strip().startswith(("{", "[")) else text

    def probe(self, name):
        get = self.container[name]["httpGet"]
        ensure(get["port"] in (self.port_name, self.container["ports"][0]["containerPort"]), f"{name} port {get['port']}")
        status, text = self.request("GET", get["path"], scheme=get.get("scheme", "HTTP"), timeout=self.container[name].get("timeoutSeconds", 1))
        return status, text

    def log_tail(self):
        try:
            with open(self.log_path, errors="replace") as fh:
                return " | ".join(fh.read().strip().splitlines()[-8:])
        except OSError:
            return ""

    def __enter__(self):
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen([COORDINATOR_BIN, *self.args], env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__()  # `with` does not call __exit__ when __enter__ fails
            raise
        return self

    def wait_ready(self):
        """Polls the startup probe as the kubelet would, then the others."""
        startup = self.container["startupProbe"]
        deadline = time.time() + min(startup["failureThreshold"] * startup["periodSeconds"], 120)
        last = None
        while True:
            code = self.process.poll()
            ensure(code is None, f"the coordinator exited with {code}: {self.log_tail()}")
            try:
                last = self.probe("startupProbe")
                if last[0] == 200:
                    break
            except OSError as e:
                last = e
            ensure(time.time() < deadline, f"startup probe never succeeded ({last}): {self.log_tail()}")
            time.sleep(0.2)
        for name in ("livenessProbe", "readinessProbe"):
            status, text = self.probe(name)
            ensure(status == 200, f"{name} answered {status}: {text[:200]}")

    def stop(self):
        """SIGTERM, as the kubelet sends it; the coordinator must exit 0
        within the pod's termination grace period."""
        import signal
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"still running {self.grace}s (terminationGracePeriodSeconds) after SIGTERM")
        ensure(code == 0, f"exited with {code} after SIGTERM: {self.log_tail()}")
        return code

    def __exit__(self, *exc):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        self.log.close()
        return False


def tokens_of(label):
    return secret_data(one(rendered[label], "Secret"))


def worker_registration(name, first_port):
    return {"name": name, "api_url": "http://127.0.0.1:10201",
            "frontend": {"mode": "port", "host": "127.0.0.1", "port_range": [first_port, first_port + 95]}}


def run_first_install():
    ensure("default" in rendered, "the no-values render failed")
    tokens = tokens_of("default")
    with tempfile.TemporaryDirectory() as tmp:
        with Pod("default", tmp) as pod:
            data_dir = pod.volume_dir("/data")
            ensure(os.path.isfile(os.path.join(data_dir, "coordinator.db")), "no coordinator.db on the /data volume")
            for name in ("manager.token", "worker.token"):
                ensure(not os.path.exists(os.path.join(data_dir, name)), f"{name} generated: the Secret's token was not used")
            status, _ = pod.request("GET", "/workers", "not-the-token")
            ensure(status == 401, f"a wrong token answered {status}")
            pod.call("GET", "/workers", tokens["manager-token"])
            reg = pod.call("POST", "/workers/register", tokens["worker-token"], worker_registration("chart-check-restart", 10205))
            status, _ = pod.request("GET", "/workers", tokens["worker-token"])
            ensure(status in (401, 403), f"the worker bootstrap token reached a manager endpoint ({status})")
            pod.stop()
        with Pod("default", tmp) as pod:
            workers = pod.call("GET", "/workers", tokens["manager-token"])
            listed = json.dumps(workers)
            ensure(reg["worker"]["id"] in listed, "the worker registered before the restart is gone")
            pod.stop()
    return ("probes 200 on plain HTTP, coordinator.db on the /data volume, the Secret's tokens accepted (no token files), "
            f"SIGTERM exits 0 within {pod.grace}s, a restart on the same volume finds its worker")


def make_tls_secret(tmp):
    openssl = shutil.which("openssl")
    if not openssl:
        return None
    cert, key = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
    out = subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                          "-nodes", "-days", "1", "-subj", "/CN=appproxy-coordinator",
                          "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert],
                         capture_output=True, text=True, timeout=60)
    ensure(out.returncode == 0, f"openssl: {out.stderr.strip()}")
    with open(cert, "rb") as c, open(key, "rb") as k:
        return cert, {"tls.crt": c.read(), "tls.key": k.read()}


def run_tls_install():
    ensure("tls" in rendered, "the TLS render failed")
    with tempfile.TemporaryDirectory() as tmp:
        made = make_tls_secret(tmp)
        if made is None:
            return Skip("openssl not installed (needed for a throwaway certificate)")
        ca_file, secret = made
        name = load_values(*tls)["tls"]["secretName"]
        pod = Pod("tls", os.path.join(tmp, "pod"), secrets={name: secret})
        pod.ca_file = ca_file
        with pod:
            # The probes above went over HTTPS, verified against the mounted certificate.
            import urllib.request
            try:
                urllib.request.urlopen(pod.url("/livez", "http"), timeout=5)
                plain = True
            except Exception:
                plain = False
            ensure(not plain, "plain HTTP is answered too")
            pod.stop()
    return "startup, liveness and readiness probes 200 over HTTPS with the mounted certificate (verified); plain HTTP refused"


def redis_answers(url):
    """Whether a Redis server answers at the host and port of `url`."""
    import socket
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=3) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH", b"-ERR"))


def run_backendai_install():
    ensure("backendai" in rendered, "the Backend.AI render failed")
    redis_url = os.environ.get("CHART_CHECK_REDIS_URL", "redis://127.0.0.1:6379/0")
    if not redis_answers(redis_url):
        return Skip(f"no Redis answers at {redis_url} (set CHART_CHECK_REDIS_URL)")
    values = load_values(*backendai)["backendai"]
    secret = {k: base64.b64decode(v) for k, v in one(rendered["backendai"], "Secret")["data"].items()}
    secret["redis-url"] = redis_url.encode()  # the rendered one names the cluster's Redis
    if "backendai-core-redis-url" in secret:  # the Manager's, likewise
        secret["backendai-core-redis-url"] = redis_url.encode()
    tokens = {k: v.decode() for k, v in secret.items()}
    with tempfile.TemporaryDirectory() as tmp:
        with Pod("backendai", tmp, secrets={FULLNAME: secret}) as pod:
            status, text = pod.request("GET", "/status")
            ensure(status == 200, f"GET /status answered {status}: {text[:200]}")
            body = json.loads(text)
            ensure(body.get("advertise_address") == values["advertisedUrl"],
                   f"GET /status advertises {body.get('advertise_address')!r}, not backendai.advertisedUrl")
            pod.call("GET", "/workers", tokens["manager-token"])
            pod.stop()
        # What the coordinator made of the pod's environment (secrets redacted).
        args = ["config" if a == "serve" else a for a in pod.args]
        out = subprocess.run([COORDINATOR_BIN, *args], env=pod.env, capture_output=True, text=True, timeout=60)
        ensure(out.returncode == 0, f"{COORDINATOR_BIN} config: {out.stderr.strip() or out.stdout.strip()}")
        for key in ("backendai-api-secret", "backendai-jwt-secret"):
            ensure(tokens[key] not in out.stdout, f"`config` prints {key}")
        effective = tomllib.loads(out.stdout)
        expected = {"backendai_conf_allowed_networks": values["confAllowedNetworks"],
                    "backendai_ack_timeout": values["ackTimeout"], "backendai_idle_timeout": values["idleTimeout"],
                    "advertised_url": values["advertisedUrl"]}
        got = {k: effective.get(k) for k in expected}
        ensure(got == expected, f"the coordinator read {got}, not {expected}")
        # rediss:// (which the schema allows) to the same, plaintext, Redis:
        # the coordinator starts, and /health finds no Redis there (no
        # fallback to plaintext; the TLS handshake gets no answer).
        from urllib.parse import urlsplit
        parts = urlsplit(redis_url)
        secret["redis-url"] = f"rediss://{parts.netloc}{parts.path}".encode()
        with Pod("backendai", os.path.join(tmp, "rediss"), secrets={FULLNAME: secret}) as pod:
            status, text = pod.request("GET", "/health")
            ensure(status == 200, f"GET /health answered {status}: {text[:200]}")
            checks = {c["service_group"]: c for c in json.loads(text)["connectivity"]["connectivity_checks"]}
            message = checks["redis"].get("error_message") or ""
            ensure(checks["redis"]["is_healthy"] is False and message,
                   f"rediss:// to a plaintext Redis: {checks['redis']}")
            pod.stop()
    return (f"probes 200 with the rendered secrets and {redis_url}; GET /status advertises {values['advertisedUrl']}; "
            "the native API still answers; networks and timeouts read as rendered; secrets redacted; "
            "with rediss:// to that plaintext Redis it starts and /health reports Redis unhealthy (no plaintext fallback)")


check("the coordinator runs as the no-values pod: SQLite volume, generated tokens, clean stop, restart", run_first_install)
check("the coordinator runs as the TLS pod: HTTPS probes", run_tls_install)
check("the coordinator runs as the Backend.AI pod: GET /status, every backendai value read", run_backendai_install)


# ---------------------------------------------------------------------------
# The Grafana dashboard against the coordinator's /metrics.

DASHBOARD = os.path.join(CHART, "dashboards", "appproxy-coordinator.json")
# Labels Prometheus attaches to every scraped series (target labels of plain
# scrape configs and of the Prometheus Operator), and the histogram bucket label.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}


def parse_exposition(text):
    """{family: type} from the # TYPE lines, {series name: {label names}} from the samples."""
    import re
    families, series = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families[name] = kind.strip()
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", line)
            rest = line[m.end():]
            labels = set()
            if rest.startswith("{"):
                labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"', rest))
            series.setdefault(m.group(1), set()).update(labels)
    return families, series


# The series each family type exposes (OpenMetrics; the optional _created
# series count only when a scrape shows them).
SERIES_SUFFIXES = {
    "counter": ["_total"],
    "gauge": [""],
    "histogram": ["_bucket", "_sum", "_count"],
    "gaugehistogram": ["_bucket", "_gsum", "_gcount"],
    "summary": ["", "_sum", "_count"],
    "info": ["_info"],
    "stateset": [""],
    "unknown": [""],
}


def exported_series(families, series):
    """Series name -> family: the series each family's type always exposes,
    and every series the scrape showed."""
    out = {}
    for family, kind in families.items():
        for suffix in SERIES_SUFFIXES.get(kind, [""]):
            out[family + suffix] = family
    for name in series:
        family = max((f for f in families if name.startswith(f)), key=len, default=None)
        if family:
            out.setdefault(name, family)
    return out


def promql_references(expr):
    """(metric names, label names) an expression uses."""
    import re
    e = re.sub(r"\$\{[^}]*\}|\$\w+", " ", expr)  # Grafana variables
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', e)  # strings
    labels = set()
    for block in re.findall(r"\{([^}]*)\}", e):
        labels |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", block))
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors and subqueries
    grouping = r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for _, block in re.findall(grouping, e):
        labels |= set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", block))
    e = re.sub(grouping, " ", e)
    keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan", "Inf", "NaN"}
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        before = e[m.start() - 1] if m.start() else " "
        if before.isalnum() or before in "._":
            continue  # part of a number such as 1e3
        if e[m.end():].lstrip().startswith("(") or m.group(0) in keywords:
            continue  # a function or a keyword
        names.add(m.group(0))
    return names, labels


def dashboard_queries(dashboard):
    """(where, PromQL, label names besides the PromQL's) of every panel target
    and every query variable (label_values(expr, label) is taken apart)."""
    import re
    out = []

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"panel {p.get('title')!r}", t["expr"], set()))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", q)
        if m:
            out.append((f"variable ${v['name']}", m.group(1), {m.group(2)}))
        elif q.strip():
            out.append((f"variable ${v['name']}", q, set()))
    return out


def exercise(pod, tokens):
    """Drives every part of the coordinator that has metrics: requests, a
    worker with a watch stream, a route create (batch, fan-out, ack lag) and a
    failover (the worker removed, its route placed on a new one by the
    leader). Returns the /metrics text taken while the stream was open and the
    one after the failover."""
    manager, bootstrap = tokens["manager-token"], tokens["worker-token"]
    reg = pod.call("POST", "/workers/register", bootstrap, worker_registration("chart-check-1", 10205))
    worker_id, worker_token = reg["worker"]["id"], reg["token"]
    status, stream = pod.request("GET", f"/workers/{worker_id}/watch?since=0", worker_token, stream=True, timeout=30)
    ensure(status == 200, f"watch answered {status}")
    events = []

    def read_stream():
        try:
            for raw_line in stream:
                line = raw_line.decode(errors="replace").strip()
                if line.startswith("event:"):
                    events.append(line.split(":", 1)[1].strip())
        except Exception:
            pass

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    try:
        route = pod.call("POST", "/routes", manager, {
            "session_id": "3f6c9a52-0d61-4a6d-9b59-2f3d6c0a1e11", "service": "jupyter",
            "targets": [{"host": "10.0.1.7", "port": 8888}]})
        deadline = time.time() + 10
        while "upsert" not in events and time.time() < deadline:
            time.sleep(0.1)
        ensure("upsert" in events, f"the worker's stream saw {events}, no upsert")
        pod.call("POST", f"/workers/{worker_id}/heartbeat", worker_token, {"acked_revision": route["revision"]})
        pod.call("GET", f"/routes/{route['id']}", manager)
        _, during = pod.request("GET", "/metrics")
    finally:
        stream.close()
    pod.call("DELETE", f"/workers/{worker_id}", manager)
    pod.call("POST", "/workers/register", bootstrap, worker_registration("chart-check-2", 10305))
    deadline = time.time() + 20
    while True:
        _, after = pod.request("GET", "/metrics")
        if "appproxy_failover_routes_total{" in after or time.time() > deadline:
            return during, after


def dashboard_metrics():
    with open(DASHBOARD) as fh:
        dashboard = json.load(fh)
    ids = [p.get("id") for p in dashboard.get("panels", [])]
    ensure(len(ids) == len(set(ids)), "panel ids are not unique")
    queries = dashboard_queries(dashboard)
    ensure(queries, "the dashboard has no queries")
    # The chart ships exactly this file when dashboard.enabled.
    ensure("production" in rendered, "the production render failed")
    cms = [d for d in find(rendered["production"], "ConfigMap") if d["metadata"]["name"] == f"{FULLNAME}-dashboard"]
    ensure(len(cms) == 1, "production values render no dashboard ConfigMap")
    ensure(cms[0]["metadata"]["labels"].get("grafana_dashboard") == "1", "the dashboard lacks the sidecar label")
    ensure(json.loads(cms[0]["data"]["appproxy-coordinator.json"]) == dashboard, "the ConfigMap's JSON differs from the file")
    ensure(not [d for d in find(rendered["default"], "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")],
           "the dashboard is rendered although dashboard.enabled is false by default")

    ensure("default" in rendered, "the no-values render failed")
    with tempfile.TemporaryDirectory() as tmp:
        with Pod("default", tmp) as pod:
            during, after = exercise(pod, tokens_of("default"))
            pod.stop()
    families, series = parse_exposition(during)
    families_after, series_after = parse_exposition(after)
    families.update(families_after)
    for name, labels in series_after.items():
        series.setdefault(name, set()).update(labels)
    ensure(families, "/metrics has no # TYPE lines")
    known = exported_series(families, series)
    unknown, bad_labels, used = [], [], set()
    unverified = set()
    for where, expr, more_labels in queries:
        names, labels = promql_references(expr)
        labels |= more_labels
        for name in sorted(names):
            if name not in known:
                unknown.append(f"{name} ({where})")
                continue
            family = known[name]
            used.add(family)
            if name not in series:
                unverified.add(family)  # exported, but no sample yet: labels cannot be compared
                continue
            allowed = series[name] | TARGET_LABELS
            extra = labels - allowed
            if extra:
                bad_labels.append(f"{where}: {name} has no label {sorted(extra)} (it has {sorted(series[name])})")
    ensure(not unknown, "metrics the coordinator does not export: " + "; ".join(unknown)
           + f" (it exports the families {', '.join(f'{n} ({k})' for n, k in sorted(families.items()))})")
    ensure(not bad_labels, "; ".join(bad_labels))
    unused = sorted(set(families) - used)
    detail = (f"{len(queries)} queries use {len(used)} of the {len(families)} metric families on /metrics, "
              f"all exported; their label names checked against the scraped samples")
    if unverified:
        detail += f" (no samples to check labels against: {', '.join(sorted(unverified))})"
    if unused:
        detail += f"; not on the dashboard: {', '.join(unused)}"
    return detail


check("the Grafana dashboard uses only metrics (and labels) the coordinator exports", dashboard_metrics)


def kubectl_dry_run():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return Skip("kubectl not installed")
    probe = subprocess.run([kubectl, "version", "--request-timeout=5s", "-o", "json"],
                           capture_output=True, text=True, timeout=60)
    server = json.loads(probe.stdout or "{}").get("serverVersion") if probe.stdout.strip().startswith("{") else None
    if not server:
        return Skip("no reachable Kubernetes API server, and kubectl apply --dry-run=client needs one for "
                    "API discovery (with or without --validate=false)")
    with tempfile.TemporaryDirectory() as tmp:
        for label in CONFIGURATIONS:
            docs = [d for _, d in rendered[label] if (d["apiVersion"], d["kind"]) not in SKIP_KINDS]
            path = os.path.join(tmp, f"{label}.yaml")
            with open(path, "w") as fh:
                yaml.safe_dump_all(docs, fh)
            out = subprocess.run([kubectl, "apply", "--dry-run=client", "--validate=false", "-f", path],
                                 capture_output=True, text=True, timeout=120)
            ensure(out.returncode == 0, f"{label}: {out.stderr.strip()}")
    return f"against server {server.get('gitVersion')}"


check("kubectl apply --dry-run=client", kubectl_dry_run)

elapsed = time.time() - int(os.environ["START"])
print(f"== chart checks took {elapsed:.0f}s", flush=True)
summary = f"chart-checks: {passed} passed, {failed} failed"
if skipped:
    summary += f", {skipped} skipped"
print(summary, flush=True)
sys.exit(1 if failed else 0)
PY
exit "$status"

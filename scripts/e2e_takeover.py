#!/usr/bin/env python3
"""End to end: switch a running Backend.AI App Proxy installation to this
coordinator without restarting its worker, and back (`make e2e-takeover`).

1. upstream   the REAL Backend.AI App Proxy coordinator 26.9.6 (PyPI, its venv
              from scripts/backendai-upstream-schema.sh) on a scratch
              PostgreSQL database made by its own `schema oneshot`, and the
              real worker (scripts/backendai-worker.sh), a port worker and a
              wildcard worker; through upstream's API: two inference
              endpoints with a route and a token each (one per worker), an
              interactive app (/v2/conf -> /v2/proxy/auth -> /setup cookie).
              Traffic through the workers to small local HTTP kernels.
2. switch     upstream stopped, `import-backendai --from` its database into a
              fresh database of ours, a pause longer than our heartbeat
              timeout (the imported workers' last heartbeat is the import's
              time: they must not go Lost for that gap), ours started at the
              same address with the same secrets and Redis. Traffic keeps
              flowing meanwhile. Without restarting the workers: every URL
              answers (token, cookie), heartbeats are accepted (the workers
              stay Ready over several heartbeat periods, never Lost), route
              register/unregister on an imported endpoint moves the traffic,
              a bulk delete removes one, a new endpoint works.
3. way back   ours stopped, `export-backendai` into a fresh upstream database
              (its `schema oneshot`), upstream started again there: the
              workers keep serving every URL, upstream knows each circuit
              (GET /api/circuit/{id}, /health/status), its tokens work and its
              route register moves traffic.

Prints how long each switch took (stop -> new coordinator serving). Every
process it started is stopped and every database it made is dropped, also on
failure. Needs PostgreSQL ($APPPROXY_TEST_DATABASE_URL, default
postgres://postgres@127.0.0.1:5432/postgres; the role creates databases),
Redis on 127.0.0.1:6379, Python 3.13 for the venvs, the coordinator binary
($APPPROXY_COORDINATOR_BIN, else built with cargo).
"""

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_backendai import (  # noqa: E402
    API_SECRET,
    JWT_SECRET,
    PERMIT_SECRET,
    REDIS,
    ROOT,
    Harness,
    expect,
    free_port,
    http,
    log,
    proxied,
    wait_for,
)

ADMIN = os.environ.get("APPPROXY_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
MANAGER_TOKEN = "e2e-takeover-manager-token-0123456789"
HEARTBEAT = 1.0  # the workers' heartbeat period (s)
OUR_TIMEOUT = 3.0  # our heartbeat timeout (s)
GAP = OUR_TIMEOUT + 2.0  # import -> our start: longer than the timeout
WILDCARD_DOMAIN = ".apps.e2e-takeover.test"


def psql(url, sql):
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql], check=True, stdout=subprocess.DEVNULL)


def psql_value(url, sql):
    return subprocess.run(["psql", "-At", url, "-c", sql], check=True, capture_output=True, text=True).stdout.strip()


class Takeover(Harness):
    def __init__(self, keep=False):
        super().__init__(keep=keep)
        self.venv = subprocess.run(
            ["bash", os.path.join(ROOT, "scripts", "backendai-upstream-schema.sh"), "venv"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip().splitlines()[-1]
        self.dbs = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = ADMIN.rsplit("/", 1)[0]

    # -- databases -------------------------------------------------------

    def database(self, what):
        name = f"e2e_takeover_{what}_{os.getpid()}"
        psql(ADMIN, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        psql(ADMIN, f"CREATE DATABASE {name}")
        self.dbs.append(name)
        return name, f"{self.base}/{name}"

    def upstream_database(self, what):
        """A database made by upstream's own `schema oneshot`."""
        name, url = self.database(what)
        ini = os.path.join(self.tmp, f"alembic-{what}.ini")
        with open(ini, "w") as f:
            f.write(
                "[alembic]\n"
                "script_location = ai.backend.appproxy.coordinator.models:alembic\n"
                f"sqlalchemy.url = {url.replace('postgres://', 'postgresql+asyncpg://', 1)}\n"
            )
        subprocess.run(
            [os.path.join(self.venv, "bin", "backend.ai"), "app-proxy-coordinator", "schema", "oneshot", "-f", ini],
            check=True,
            cwd=self.tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return name, url

    # -- the coordinators --------------------------------------------------

    def start_upstream(self, db_name, run):
        u = urllib.parse.urlparse(ADMIN)
        aiomon = free_port()
        cfg = os.path.join(self.tmp, f"upstream-{run}.toml")
        with open(cfg, "w") as f:
            f.write(f"""
[db]
type = "postgresql"
name = "{db_name}"
user = "{u.username or 'postgres'}"
password = "{u.password or 'unused'}"
addr = {{ host = "{u.hostname or '127.0.0.1'}", port = {u.port or 5432} }}

[redis]
addr = {{ host = "127.0.0.1", port = 6379 }}

[core_redis]
addr = {{ host = "127.0.0.1", port = 6379 }}

[proxy_coordinator]
ipc_base_path = "{self.tmp}/upstream-ipc"
event_loop = "asyncio"
pid_file = "/dev/null"
id = "i-e2e-takeover"
bind_addr = {{ host = "127.0.0.1", port = {self.port} }}
advertised_addr = {{ host = "127.0.0.1", port = {self.port} }}
announce_addr = {{ host = "127.0.0.1", port = {self.port} }}
distributed_lock = "pg_advisory"
tls_listen = false
tls_advertised = false
allow_unauthorized_configure_request = true
enable_traefik = false
worker_heartbeat_timeout = 30.0
aiomonitor_termui_port = {aiomon}
aiomonitor_webui_port = {aiomon + 1}

[secrets]
jwt_secret = "{JWT_SECRET}"
api_secret = "{API_SECRET}"

[permit_hash]
secret = "{PERMIT_SECRET}"

[logging]
level = "INFO"
drivers = ["console"]

[logging.console]
colored = false
format = "verbose"

[logging.pkg_ns]
"" = "WARNING"
"ai.backend" = "INFO"

[debug]
enabled = false
""")
        name = f"upstream-{run}"
        self._spawn(
            name,
            [os.path.join(self.venv, "bin", "backend.ai"), "app-proxy-coordinator", "start-server", "-f", cfg],
        )

        def up():
            p = self.procs.get(name)
            if p is not None and p.poll() is not None:
                raise AssertionError(f"upstream exited ({p.returncode}):\n{self.log_of(name)[-3000:]}")
            return self.manager("GET", "/health/status").status == 200

        wait_for("the upstream coordinator", up, patience=120)

    def start_ours(self, db_url):
        env = {
            "APPPROXY_BIND": f"127.0.0.1:{self.port}",
            "APPPROXY_DATABASE_URL": db_url,
            "APPPROXY_DATA_DIR": os.path.join(self.tmp, "data"),
            "APPPROXY_KUBERNETES": "false",
            "APPPROXY_MANAGER_TOKEN": MANAGER_TOKEN,
            "APPPROXY_BACKENDAI_API_SECRET": API_SECRET,
            "APPPROXY_BACKENDAI_JWT_SECRET": JWT_SECRET,
            "APPPROXY_REDIS_URL": REDIS,
            "APPPROXY_BACKENDAI_CONF_ALLOWED_NETWORKS": "127.0.0.0/8",
            "APPPROXY_ADVERTISED_URL": self.url,
            "APPPROXY_HEARTBEAT_TIMEOUT": f"{OUR_TIMEOUT}s",
            "APPPROXY_FAILOVER_GRACE": "1s",
            "RUST_LOG": os.environ.get("RUST_LOG", "info"),
        }
        self._spawn("ours", [self.bin], env=env)
        wait_for("our coordinator", lambda: http("GET", f"{self.url}/readyz").status == 200)

    def ours(self, *args, env=None):
        out = subprocess.run(
            [self.bin, *args],
            env={**os.environ, "RUST_LOG": "warn", **(env or {})},
            capture_output=True,
            text=True,
        )
        expect(out.returncode == 0, f"{args[0]} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def manager_token(self):
        return MANAGER_TOKEN

    def close(self, failed):
        if failed:
            for name in list(self.procs):
                text = self.log_of(name)
                if text and name != "kernel":
                    print(f"----- {name} log (last 4000 chars) -----\n{text[-4000:]}")
        for name in list(self.procs):
            self.stop(name)
        for db in self.dbs:
            try:
                psql(ADMIN, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            except subprocess.CalledProcessError as e:
                log(f"dropping {db}: {e}")
        super().close(failed)

    # -- kernels, workers ---------------------------------------------------

    def start_kernel_named(self, name, text):
        www = os.path.join(self.tmp, f"www-{name}")
        os.makedirs(www, exist_ok=True)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write(text + "\n")
        port = free_port()
        self._spawn(f"kernel-{name}", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=www)
        wait_for(f"kernel {name}", lambda: http("GET", f"http://127.0.0.1:{port}/").status == 200)
        return port

    def start_wildcard_worker(self, name, authority):
        api_port, traffic_port, aiomon = free_port(), free_port(), free_port()
        cfg = os.path.join(self.tmp, name, "worker.toml")
        subprocess.run(
            [
                self.worker_script, "config", cfg,
                "--coordinator", self.url,
                "--authority", authority,
                "--api-port", str(api_port),
                "--wildcard-domain", WILDCARD_DOMAIN,
                "--wildcard-port", str(traffic_port),
                "--traffics", "inference",
                "--redis", REDIS,
                "--api-secret", API_SECRET,
                "--jwt-secret", JWT_SECRET,
                "--permit-secret", PERMIT_SECRET,
                "--heartbeat", str(HEARTBEAT),
                "--aiomonitor-port", str(aiomon),
                "--ipc-dir", os.path.join(self.tmp, name, "ipc"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self._spawn(name, [self.worker_script, "run", cfg], cwd=os.path.join(self.tmp, name))
        wait_for(f"worker {name} to start", lambda: self._worker_started(name))
        return {"authority": authority, "traffic_port": traffic_port}


# ---------------------------------------------------------------------------


class Url:
    """A URL the Manager holds, reached through a worker: a port worker's
    directly, a wildcard worker's (a subdomain nobody resolves) at its
    address with its Host header."""

    def __init__(self, url):
        self.url = url
        u = urllib.parse.urlparse(url)
        if u.hostname and u.hostname.endswith(WILDCARD_DOMAIN):
            self.target = f"http://127.0.0.1:{u.port or 80}{u.path or '/'}"
            self.host = u.netloc
        else:
            self.target, self.host = url, None

    @property
    def wildcard(self):
        return self.host is not None

    def get(self, token=None, cookie=None):
        headers = {}
        if token:
            headers["Authorization"] = f"BackendAI {token}"
        if cookie:
            headers["Cookie"] = cookie
        if self.host:
            headers["Host"] = self.host
        return http("GET", self.target, headers=headers, timeout=10)


def endpoint(h, name, kernel_port):
    """An inference endpoint with one route to `kernel_port`, and a token."""
    user, (ep,), items = h.create_endpoints(1, name)
    dep = ep["deployment_id"]
    h.kernel_port = kernel_port
    route = h.register_route(dep)
    token = h.token(dep, user)
    e = {"dep": dep, "user": user, "route": route, "token": token, "url": Url(ep["url"]), "item": items[0]}
    wait_for(f"{name}: 200 through the worker", lambda: e["url"].get(token).status == 200)
    return e


def interactive(h, kernel_port):
    session, user = str(uuid.uuid4()), str(uuid.uuid4())
    a = http(
        "POST",
        f"{h.url}/v2/conf",
        {
            "login_session_token": None,
            "kernel_host": "127.0.0.1",
            "kernel_port": kernel_port,
            "session": {
                "id": session,
                "user_uuid": user,
                "group_id": str(uuid.uuid4()),
                "access_key": "AKIAE2E",
                "domain_name": "default",
            },
        },
    )
    expect(a.status == 200 and a.json and a.json.get("token"), f"/v2/conf: {a}")
    q = urllib.parse.urlencode(
        {"token": a.json["token"], "session_id": session, "app": "jupyter", "protocol": "http", "redirect": "/"}
    )
    a = http("GET", f"{h.url}/v2/proxy/auth?{q}", headers={"Accept": "application/json"})
    expect(a.status == 200, f"/v2/proxy/auth: {a}")
    a = http("GET", a.json["redirect_url"])
    expect(a.status == 302, f"/setup answers 302: {a}")
    cookie = a.headers["Set-Cookie"].split(";", 1)[0]
    app = {"url": Url(a.headers["Location"]), "cookie": cookie}
    wait_for("interactive: 200 with the cookie", lambda: app["url"].get(cookie=cookie).status == 200)
    return app


def serving(what, answer, text):
    return answer.status == 200 and text.encode() in answer.raw


def all_serve(eps, app, expected):
    for name, e in eps.items():
        a = e["url"].get(e["token"])
        expect(serving(name, a, expected[name]), f"{name} ({e['url'].url}) through its worker: {a}")
    a = app["url"].get(cookie=app["cookie"])
    expect(a.status == 200, f"interactive ({app['url'].url}) with its cookie: {a}")


def workers_status(h, headers):
    a = http("GET", f"{h.url}/health/status", headers=headers)
    expect(a.status == 200, f"/health/status: {a}")
    return a


def scenario(h):
    k1 = h.start_kernel_named("one", "kernel one")
    k2 = h.start_kernel_named("two", "kernel two")
    ki = h.start_kernel_named("app", "interactive app")
    h.authorities = ["e2e-takeover-port", "e2e-takeover-wild"]

    # 1. upstream, with its workers and state
    a_name, a_url = h.upstream_database("a")
    h.start_upstream(a_name, "first")
    h.start_worker("port-worker", "e2e-takeover-port", heartbeat=HEARTBEAT)
    h.start_wildcard_worker("wild-worker", "e2e-takeover-wild")
    bai = {"X-BackendAI-Token": API_SECRET}
    wait_for(
        "upstream: both workers registered",
        lambda: len((workers_status(h, bai).json or {}).get("workers", [])) == 2,
    )
    log("upstream: endpoints, routes, tokens, an interactive app")
    # Upstream prefers the wildcard worker, which takes only inference: the
    # endpoints go there, the interactive app to the port worker.
    eps = {"first": endpoint(h, "first", k1), "second": endpoint(h, "second", k1)}
    app = interactive(h, ki)
    expect(all(e["url"].wildcard for e in eps.values()), f"endpoints on the wildcard worker: {eps}")
    expect(not app["url"].wildcard, f"the interactive app on the port worker: {app['url'].url}")
    log(f"upstream: endpoints at {eps['first']['url'].url}, …; the app at {app['url'].url}")
    expected = {"first": "kernel one", "second": "kernel one"}
    all_serve(eps, app, expected)

    # 2. the switch
    log("switch: stop upstream, import, (pause), start ours")
    t0 = time.monotonic()
    h.stop("upstream-first")
    b_name, b_url = h.database("b")
    out = h.ours("import-backendai", "--from", a_url, "--database-url", b_url)
    log("import: " + " | ".join(out.strip().splitlines()))
    t_import = time.monotonic()
    # Traffic never stops: the workers serve from what they hold.
    all_serve(eps, app, expected)
    # Longer than our heartbeat timeout: the imported workers' last heartbeat
    # is the import's time, and they cannot reach anyone meanwhile.
    paused = time.monotonic()
    while time.monotonic() - t_import < GAP:
        time.sleep(0.1)
    paused = time.monotonic() - paused
    h.start_ours(b_url)
    switch = time.monotonic() - t0 - paused
    log(f"switch to ours took {switch:.2f} s (stop -> import -> serving; a deliberate pause of {paused:.1f} s excluded)")
    all_serve(eps, app, expected)
    native = {"Authorization": f"Bearer {MANAGER_TOKEN}"}

    def workers():
        a = http("GET", f"{h.url}/workers", headers=native)
        expect(a.status == 200, f"/workers: {a}")
        return {w["name"]: w for w in a.json["items"]}

    # Every circuit upstream made, for the Redis cleanup (the worker's counters).
    a = http("GET", f"{h.url}/routes", headers=native)
    expect(a.status == 200 and len(a.json["items"]) == 3, f"imported routes: {a}")
    h.circuits.update(r["id"] for r in a.json["items"])
    first_seen = {n: w["last_heartbeat"] for n, w in workers().items()}
    expect(set(first_seen) == set(h.authorities), f"imported workers: {first_seen}")
    # Heartbeats accepted: each worker's last heartbeat moves on, and the
    # workers stay Ready longer than our heartbeat timeout.
    started = time.monotonic()
    wait_for(
        "heartbeats to our coordinator",
        lambda: all(w["last_heartbeat"] != first_seen[n] for n, w in workers().items()),
    )
    while time.monotonic() - started < OUR_TIMEOUT + 3 * HEARTBEAT:
        ws = workers()
        expect(all(w["status"] == "Ready" for w in ws.values()), f"a worker not Ready: {ws}")
        time.sleep(0.25)
    st = workers_status(h, bai).json
    expect(len(st["workers"]) == 2, f"/health/status: {st}")
    lost = [line for line in h.log_of("ours").splitlines() if "worker status changed" in line and "Lost" in line]
    expect(not lost, f"a worker went Lost after the switch: {lost}")
    all_serve(eps, app, expected)

    log("ours: the Manager's re-sync of an imported endpoint (bulk create with existing_url) keeps its URL")
    item = dict(eps["first"]["item"])
    item["tags"] = {**item["tags"], "endpoint": {**item["tags"]["endpoint"], "existing_url": eps["first"]["url"].url}}
    (again,) = h.bulk_create([item])
    expect(again["url"] == eps["first"]["url"].url, f"re-sync answered another URL: {again}")
    all_serve(eps, app, expected)
    log("ours: route register/unregister on an imported endpoint moves the traffic")
    first = eps["first"]
    h.kernel_port = k2
    new_route = h.register_route(first["dep"])
    h.unregister_route(first["dep"], first["route"])
    first["route"] = new_route
    expected["first"] = "kernel two"
    wait_for("the first endpoint on kernel two", lambda: serving("first", first["url"].get(first["token"]), "kernel two"))
    log("ours: bulk delete removes the second endpoint")
    second = eps.pop("second")
    a = h.manager("DELETE", "/v2/endpoints/bulk", {"endpoints": [{"deployment_id": second["dep"]}]})
    expect(a.status == 200 and a.json["endpoints"][0]["success"], f"bulk delete: {a}")
    wait_for("the second endpoint gone", lambda: second["url"].get(second["token"]).status != 200)
    log("ours: a new endpoint")
    eps["third"] = endpoint(h, "third", k1)
    expected["third"] = "kernel one"
    all_serve(eps, app, expected)
    circuits = {name: h.circuit_id_of(e["dep"]) for name, e in eps.items()}
    h.circuits.update(c for c in circuits.values() if c)

    # 3. the way back
    log("way back: stop ours, export, start upstream")
    t0 = time.monotonic()
    h.stop("ours")
    c_name, c_url = h.upstream_database("c")
    out = h.ours("export-backendai", "--database-url", b_url, env={"APPPROXY_EXPORT_TO": c_url})
    log("export: " + " | ".join(out.strip().splitlines()))
    expect("0 native routes" in out, f"nothing native here: {out}")
    upstream_started = psql_value(c_url, "SELECT now()")
    h.start_upstream(c_name, "again")
    back = time.monotonic() - t0
    log(f"switch back to upstream took {back:.2f} s (stop -> export -> upstream serving)")
    all_serve(eps, app, expected)
    st = workers_status(h, bai).json
    listed = sorted(w["authority"] for w in st["workers"])
    expect(listed == sorted(h.authorities), f"upstream's active workers: {st}")
    # Upstream accepts their heartbeats: each one's row is updated after its start.
    wait_for(
        "upstream: a heartbeat from each worker",
        lambda: psql_value(
            c_url, f"SELECT count(*) FROM workers WHERE status = 'ALIVE' AND updated_at > '{upstream_started}'"
        )
        == "2",
    )
    for name, cid in circuits.items():
        a = h.manager("GET", f"/api/circuit/{cid}")
        expect(a.status == 200 and a.json and a.json.get("id") == cid, f"upstream's circuit {name}: {a}")
    # Upstream's own token and route register work on what ours handed back.
    third = eps["third"]
    token = h.token(third["dep"], third["user"])
    h.kernel_port = k2
    route = h.register_route(third["dep"])
    h.unregister_route(third["dep"], third["route"])
    third["route"], third["token"] = route, token
    expected["third"] = "kernel two"
    wait_for("upstream moved the third endpoint to kernel two", lambda: serving("third", third["url"].get(token), "kernel two"))
    all_serve(eps, app, expected)
    log(f"all passed: switch {switch:.2f} s, back {back:.2f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    h = Takeover(keep=args.keep)
    failed = True
    try:
        scenario(h)
        failed = False
    finally:
        h.close(failed)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()

#!/usr/bin/env python3
"""End to end with the unmodified Backend.AI App Proxy worker.

Starts this coordinator in Backend.AI mode (embedded SQLite in a temporary
directory, the local Redis), a stand-in kernel (`python3 -m http.server`), and
the real `backend-ai-appproxy-worker` from PyPI (scripts/backendai-worker.sh),
then plays the Backend.AI Manager and a browser against them:

  inference    POST /v2/endpoints/bulk + /routes/register -> 200 through the
               worker with a token from /v2/endpoints/{id}/token, 401 without;
               /routes/unregister and bulk delete stop it
  interactive  /v2/conf -> /v2/proxy/auth -> the worker's /setup (cookie) -> 200
  restart      the worker killed and started again gets every circuit back
  failover     a second worker takes new circuits while the first is Lost

With --bench it measures instead (bench/backendai.json): the worker's own
ceiling (created events straight to Redis, acknowledgements timed) and the
Manager's create + delete pairs from 1 and 16 clients as a ratio to it, bulk
create of 100 endpoints with the worker acknowledging, route register and
unregister calls per second, and create-to-first-proxied-200 latency, each next
to the same work through the native API (or straight to the kernel) in the
same run.

Every process it starts is stopped and every Redis key it caused is removed,
whatever happens. Needs: Redis on 127.0.0.1:6379, Python 3.13 for the worker
(see scripts/backendai-worker.sh), the coordinator binary
($APPPROXY_COORDINATOR_BIN, else built with cargo).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_SECRET = "e2e-backendai-api-secret-0123456789"
JWT_SECRET = "e2e-backendai-jwt-secret-0123456789"
PERMIT_SECRET = "e2e-backendai-permit-secret"
REDIS = "redis://127.0.0.1:6379"
PATIENCE = 60.0  # generous: a loaded machine is slow, never wrong


def log(msg):
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_range(n):
    """n consecutive free ports."""
    for _ in range(200):
        base = free_port()
        if base + n >= 65000:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base, base + n - 1
    raise RuntimeError("no free port range")


class Answer:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.raw = body
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def __repr__(self):
        return f"<{self.status} {self.raw[:300]!r}>"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


OPENER = urllib.request.build_opener(NoRedirect)


def http(method, url, body=None, headers=None, timeout=30):
    data = None
    headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with OPENER.open(req, timeout=timeout) as r:
            return Answer(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, e.headers, e.read())
    except (urllib.error.URLError, ConnectionError, socket.timeout) as e:
        return Answer(0, {}, str(e).encode())


def wait_for(what, check, patience=PATIENCE, step=0.1):
    deadline = time.monotonic() + patience
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


class Redis:
    """Just enough RESP for cleanup and checks (no dependency)."""

    def __init__(self, host="127.0.0.1", port=6379):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b"-"):
            return rest.decode()
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.sock.recv(65536)
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data.decode()
        if kind == b"*":
            return [self._read() for _ in range(int(rest))]
        raise ValueError(line)

    def cmd(self, *args):
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        self.sock.sendall(out)
        return self._read()


class Harness:
    def __init__(self, keep=False):
        self.tmp = tempfile.mkdtemp(prefix="e2e-backendai-")
        self.keep = keep
        self.procs = {}
        self.circuits = set()
        given = os.environ.get("APPPROXY_COORDINATOR_BIN")
        self.bin = os.path.abspath(given) if given else self._build()
        self.worker_script = os.path.join(ROOT, "scripts", "backendai-worker.sh")
        subprocess.run([self.worker_script, "venv"], check=True, stdout=subprocess.DEVNULL)
        self.redis = Redis()
        expect(self.redis.cmd("PING") == "PONG", "Redis on 127.0.0.1:6379 does not answer")

    @staticmethod
    def _build():
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        subprocess.run(
            ["cargo", "build", "--locked", "--bin", "appproxy-coordinator"],
            cwd=ROOT,
            check=True,
        )
        return os.path.join(target, "debug", "appproxy-coordinator")

    # -- processes -------------------------------------------------------

    def _spawn(self, name, argv, env=None, cwd=None):
        logf = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        p = subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd or self.tmp,
            start_new_session=True,
        )
        self.procs[name] = p
        return p

    def log_of(self, name):
        try:
            with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, name, sig=signal.SIGTERM):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def start_kernel(self):
        """A stand-in kernel app: serves a directory over HTTP."""
        www = os.path.join(self.tmp, "www")
        os.makedirs(www, exist_ok=True)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write("hello from the kernel\n")
        self.kernel_port = free_port()
        self._spawn(
            "kernel",
            [sys.executable, "-m", "http.server", str(self.kernel_port), "--bind", "127.0.0.1"],
            cwd=www,
        )
        wait_for(
            "the kernel",
            lambda: http("GET", f"http://127.0.0.1:{self.kernel_port}/").status == 200,
        )

    def start_coordinator(self, extra_env=None):
        self.port = getattr(self, "port", None) or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            "APPPROXY_BIND": f"127.0.0.1:{self.port}",
            "APPPROXY_DATA_DIR": os.path.join(self.tmp, "data"),
            "APPPROXY_KUBERNETES": "false",
            "APPPROXY_BACKENDAI_API_SECRET": API_SECRET,
            "APPPROXY_BACKENDAI_JWT_SECRET": JWT_SECRET,
            "APPPROXY_REDIS_URL": REDIS,
            "APPPROXY_BACKENDAI_CONF_ALLOWED_NETWORKS": "127.0.0.0/8",
            "APPPROXY_ADVERTISED_URL": self.url,
            "APPPROXY_HEARTBEAT_TIMEOUT": "4s",
            "APPPROXY_FAILOVER_GRACE": "1s",
            "RUST_LOG": os.environ.get("RUST_LOG", "info"),
        }
        if getattr(self, "database_url", None):
            env["APPPROXY_DATABASE_URL"] = self.database_url
        env.update(extra_env or {})
        self._spawn("coordinator", [self.bin], env=env)
        wait_for("the coordinator", lambda: http("GET", f"{self.url}/readyz").status == 200)

    def start_worker(self, name, authority, heartbeat=1.0, config_of=None, ports=20, extra_config=()):
        """Starts a worker; `config_of` names an earlier one whose config
        (ports included) it reuses, as a restarted worker does;
        `extra_config`: more options of `backendai-worker.sh config`."""
        if config_of is not None:
            cfg = os.path.join(self.tmp, config_of, "worker.toml")
            self._spawn(name, [self.worker_script, "run", cfg], cwd=os.path.join(self.tmp, config_of))
            wait_for(f"worker {name} to start", lambda: self._worker_started(name))
            return
        lo, hi = free_range(ports)
        api_port = free_port()
        aiomon = free_port()
        cfg = os.path.join(self.tmp, name, "worker.toml")
        subprocess.run(
            [
                self.worker_script, "config", cfg,
                "--coordinator", self.url,
                "--authority", authority,
                "--api-port", str(api_port),
                "--port-range", f"{lo}-{hi}",
                "--redis", REDIS,
                "--api-secret", API_SECRET,
                "--jwt-secret", JWT_SECRET,
                "--permit-secret", PERMIT_SECRET,
                "--heartbeat", str(heartbeat),
                "--aiomonitor-port", str(aiomon),
                "--ipc-dir", os.path.join(self.tmp, name, "ipc"),
                *extra_config,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self._spawn(name, [self.worker_script, "run", cfg], cwd=os.path.join(self.tmp, name))
        wait_for(
            f"worker {name} to start",
            lambda: self._worker_started(name),
        )
        return {"authority": authority, "api_port": api_port, "range": (lo, hi)}

    def _worker_started(self, name):
        p = self.procs.get(name)
        if p is not None and p.poll() is not None:
            raise AssertionError(f"worker {name} exited ({p.returncode}):\n{self.log_of(name)[-3000:]}")
        return "Started the app-proxy worker service" in self.log_of(name)

    def close(self, failed):
        for name in list(self.procs):
            self.stop(name)
        try:
            for cid in self.circuits:
                self.redis.cmd("SELECT", 2)
                self.redis.cmd(
                    "DEL",
                    f"circuit.{cid}.last_access",
                    f"circuit.{cid}.requests",
                )
            self.redis.cmd("SELECT", 2)
            for auth in getattr(self, "authorities", []):
                self.redis.cmd("HDEL", "proxy-worker.last_seen", auth)
        except Exception as e:  # cleanup must not hide the real failure
            log(f"redis cleanup: {e}")
        if failed:
            for name in ("coordinator", "worker-1", "worker-1b", "worker-2"):
                text = self.log_of(name)
                if text:
                    print(f"----- {name} log (last 4000 chars) -----\n{text[-4000:]}")
        if self.keep or failed and os.environ.get("E2E_KEEP"):
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the Manager's calls --------------------------------------------

    def manager(self, method, path, body=None, accept_json=True):
        headers = {"X-BackendAI-Token": API_SECRET}
        if accept_json:
            headers["Accept"] = "application/json"
        return http(method, f"{self.url}{path}", body, headers)

    def create_endpoints(self, n, name="model"):
        """Bulk-creates n inference endpoints; answers the user, the
        answer's items and the request's items (to send again)."""
        user = str(uuid.uuid4())
        items = []
        for i in range(n):
            dep = str(uuid.uuid4())
            items.append(
                {
                    "deployment_id": dep,
                    "version": "v2",
                    "service_name": f"{name}-{i}",
                    "tags": {
                        "session": {"user_uuid": user, "project_id": str(uuid.uuid4()), "domain_name": "default"},
                        "endpoint": {"id": dep, "runtime_variant": "custom", "existing_url": None},
                    },
                    "open_to_public": False,
                    "health_check": None,
                }
            )
        return user, self.bulk_create(items), items

    def bulk_create(self, items):
        a = self.manager("POST", "/v2/endpoints/bulk", {"endpoints": items})
        expect(a.status == 200, f"bulk create: {a}")
        out = a.json["endpoints"]
        expect([e["deployment_id"] for e in out] == [i["deployment_id"] for i in items], f"order: {a}")
        return out

    def register_route(self, deployment, route_id=None):
        route_id = route_id or str(uuid.uuid4())
        a = self.manager(
            "POST",
            "/v2/endpoints/bulk/routes/register",
            {
                "endpoints": [
                    {
                        "deployment_id": deployment,
                        "routes": [
                            {
                                "session_id": str(uuid.uuid4()),
                                "route_id": route_id,
                                "kernel_host": "127.0.0.1",
                                "kernel_port": self.kernel_port,
                            }
                        ],
                    }
                ]
            },
        )
        expect(a.status == 200 and a.json["endpoints"][0]["success"], f"register: {a}")
        return route_id

    def unregister_route(self, deployment, route_id):
        a = self.manager(
            "POST",
            "/v2/endpoints/bulk/routes/unregister",
            {"endpoints": [{"deployment_id": deployment, "route_ids": [route_id]}]},
        )
        expect(a.status == 200 and a.json["endpoints"][0]["success"], f"unregister: {a}")

    def token(self, deployment, user):
        exp = int(time.time()) + 3600
        a = self.manager("POST", f"/v2/endpoints/{deployment}/token", {"user_uuid": user, "exp": exp})
        expect(a.status == 200, f"token: {a}")
        return a.json["token"]

    def circuit_id_of(self, deployment):
        a = http(
            "GET",
            f"{self.url}/routes?endpoint_id={deployment}",
            headers={"Authorization": f"Bearer {self.manager_token()}"},
        )
        routes = [r for r in (a.json or {}).get("items", []) if r.get("endpoint_id") == deployment]
        return routes[0]["id"] if routes else None

    def manager_token(self):
        with open(os.path.join(self.tmp, "data", "manager.token")) as f:
            return f.read().strip()


def proxied(url, token=None, cookie=None):
    headers = {}
    if token:
        headers["Authorization"] = f"BackendAI {token}"
    if cookie:
        headers["Cookie"] = cookie
    return http("GET", url, headers=headers, timeout=10)


# ---------------------------------------------------------------------------
# The scenario


def inference(h):
    log("inference: bulk create, register a route, token")
    user, (ep,), items = h.create_endpoints(1, "llm")
    dep, url = ep["deployment_id"], ep["url"]
    expect(url.endswith("/"), f"upstream URLs end in '/': {url}")
    # Idempotent: the Manager retries; same URL, nothing else.
    log(f"inference: created {url}")
    (again,) = h.bulk_create(items)
    expect(again["url"] == url, f"re-create changed the URL: {again} vs {ep}")
    route = h.register_route(dep)
    token = h.token(dep, user)
    log("inference: route registered, token issued")
    wait_for("200 through the worker with the token", lambda: proxied(url, token).status == 200)
    body = proxied(url, token).raw
    expect(b"hello from the kernel" in body, f"the kernel's page: {body[:200]!r}")
    a = proxied(url)
    expect(a.status == 401, f"without a token the worker answers 401: {a}")
    h.circuits.add(h.circuit_id_of(dep))
    log("inference: unregister -> no backend")
    h.unregister_route(dep, route)
    wait_for("the worker to drop the route", lambda: proxied(url, token).status in (502, 503))
    route = h.register_route(dep)
    wait_for("the route back", lambda: proxied(url, token).status == 200)
    return {"deployment": dep, "url": url, "token": token, "user": user}


def interactive(h):
    log("interactive: /v2/conf -> /v2/proxy/auth -> /setup -> 200")
    session = str(uuid.uuid4())
    user = str(uuid.uuid4())
    # The Manager sends /v2/conf with no token at all (from an allowed network).
    a = http(
        "POST",
        f"{h.url}/v2/conf",
        {
            "login_session_token": None,
            "kernel_host": "127.0.0.1",
            "kernel_port": h.kernel_port,
            "session": {
                "id": session,
                "user_uuid": user,
                "group_id": str(uuid.uuid4()),
                "access_key": "AKIAE2E",
                "domain_name": "default",
            },
        },
    )
    expect(a.status == 200 and a.json.get("token"), f"/v2/conf: {a}")
    conf = a.json["token"]
    q = urllib.parse.urlencode(
        {"token": conf, "session_id": session, "app": "jupyter", "protocol": "http", "redirect": "/index.html"}
    )
    a = http("GET", f"{h.url}/v2/proxy/auth?{q}", headers={"Accept": "application/json"})
    expect(a.status == 200, f"/v2/proxy/auth: {a}")
    setup = a.json["redirect_url"]
    a = http("GET", setup)
    expect(a.status == 302, f"/setup answers 302: {a}")
    location = a.headers["Location"]
    cookie = a.headers["Set-Cookie"].split(";", 1)[0]
    expect(cookie.startswith("appproxy_permit="), f"permit cookie: {cookie}")
    wait_for("200 with the cookie", lambda: proxied(location, cookie=cookie).status == 200)
    a = proxied(location)
    expect(a.status == 401, f"without the cookie: {a}")
    return {"url": location, "cookie": cookie}


def restart(h, inf, ia):
    log("restart: kill the worker, start it again: every circuit comes back")
    h.stop("worker-1", signal.SIGKILL)
    wait_for("the circuits to be gone", lambda: proxied(inf["url"], inf["token"]).status == 0)
    h.start_worker("worker-1b", "e2e-worker-1", config_of="worker-1")
    wait_for("inference back", lambda: proxied(inf["url"], inf["token"]).status == 200)
    wait_for("interactive back", lambda: proxied(ia["url"], cookie=ia["cookie"]).status == 200)


def failover(h):
    log("failover: the first worker is Lost; a second takes new circuits")
    h.stop("worker-1b", signal.SIGKILL)
    mt = h.manager_token()

    def lost():
        a = http("GET", f"{h.url}/workers", headers={"Authorization": f"Bearer {mt}"})
        ws = (a.json or {}).get("items", [])
        return any(w["name"] == "e2e-worker-1" and w["status"] == "Lost" for w in ws)

    wait_for("worker 1 to be Lost", lost)
    h.start_worker("worker-2", "e2e-worker-2")
    user, (ep,), _ = h.create_endpoints(1, "second")
    h.register_route(ep["deployment_id"])
    token = h.token(ep["deployment_id"], user)
    wait_for("200 through worker 2", lambda: proxied(ep["url"], token).status == 200)
    h.circuits.add(h.circuit_id_of(ep["deployment_id"]))
    log("bulk delete stops it")
    a = h.manager("DELETE", "/v2/endpoints/bulk", {"endpoints": [{"deployment_id": ep["deployment_id"]}]})
    expect(a.status == 200 and a.json["endpoints"][0]["success"], f"bulk delete: {a}")
    wait_for("the endpoint to stop", lambda: proxied(ep["url"], token).status != 200)


def scenario(h):
    h.authorities = ["e2e-worker-1", "e2e-worker-2"]
    h.start_kernel()
    h.start_coordinator()
    h.start_worker("worker-1", "e2e-worker-1")
    inf = inference(h)
    ia = interactive(h)
    restart(h, inf, ia)
    failover(h)
    log("all passed")


# ---------------------------------------------------------------------------
# Benchmarks


def bench(h, out_path):
    """Each Backend.AI figure next to the same work through the native API,
    on the same coordinator and worker, in the same run."""
    h.authorities = ["e2e-bench-1"]
    h.start_kernel()
    h.start_coordinator()
    worker = h.start_worker("worker-1", "e2e-bench-1", ports=300)
    native = {"Authorization": f"Bearer {h.manager_token()}"}
    results = {}

    # The create path against its real bound: what the worker alone takes
    # (created events straight to Redis), then the Manager's create + delete
    # through the coordinator from 1 and 16 clients.
    from backendai_ceiling import create_delete, creates, worker_ceiling, worker_in_flight

    steps, ceiling = worker_ceiling(h, "e2e-bench-1", worker["range"])
    for s in steps:
        log(f"worker alone: offered {s['offered_per_second']}/s -> {s}")
    results["backendai.worker_ceiling.acked_per_second"] = ceiling
    # The figure the ceilings bound: creates alone (each is one created event
    # the worker acknowledges), 16 clients, twice (the worker holds at most
    # its port range at once), each after the worker alone kept at 16 events
    # in flight.
    for run in (1, 2):
        alone = worker_in_flight(h, "e2e-bench-1", worker["range"])
        log(f"worker alone, 16 in flight: {alone}")
        for k, v in alone.items():
            results[f"backendai.worker_16_in_flight_run{run}.{k}"] = v
        r = creates(h, 16, 280)
        key = f"backendai.creates_16_clients_run{run}"
        for k, v in r.items():
            results[f"{key}.{k}"] = v
        results[f"{key}.ratio_to_worker_ceiling"] = round(r["creates_per_second"] / ceiling, 2)
        results[f"{key}.ratio_to_worker_16_in_flight"] = round(
            r["creates_per_second"] / alone["acked_per_second"], 2
        )
    for clients, pairs in ((1, 100), (16, 400)):
        r = create_delete(h, clients, pairs)
        key = f"backendai.create_delete_{clients}_clients"
        results[f"{key}.pairs_per_second"] = r["pairs_per_second"]
        results[f"{key}.create_p50_ms"] = r["create_p50_ms"]
        results[f"{key}.create_p99_ms"] = r["create_p99_ms"]
        results[f"{key}.ratio_to_worker_ceiling"] = round(r["pairs_per_second"] / ceiling, 2)
        # A pair is two of the worker's events (created, removed).
        results[f"{key}.events_per_second"] = round(2 * r["pairs_per_second"], 1)

    # Bulk create of 100 endpoints, answered once the worker acknowledged
    # each; baseline: 100 native creates (published to the same worker, no wait).
    t = time.monotonic()
    user, eps, _ = h.create_endpoints(100, "bench")
    bulk = time.monotonic() - t
    t = time.monotonic()
    native_ids = []
    for i in range(100):
        a = http(
            "POST",
            f"{h.url}/routes",
            {"app_mode": "inference", "endpoint_id": str(uuid.uuid4()), "service": f"native-{i}", "targets": []},
            native,
        )
        expect(a.status == 201, f"native create: {a}")
        native_ids.append(a.json["id"])
    base = time.monotonic() - t
    results["backendai.bulk_create_100.seconds"] = round(bulk, 3)
    results["backendai.bulk_create_100.native_baseline_seconds"] = round(base, 3)
    results["backendai.bulk_create_100.ratio"] = round(bulk / base, 2)

    # Route register + unregister calls per second (one route per call, as the
    # Manager sends them); baseline: native PATCHes of the targets.
    deps = [e["deployment_id"] for e in eps]
    t = time.monotonic()
    for dep in deps:
        rid = h.register_route(dep)
        h.unregister_route(dep, rid)
    calls = 2 * len(deps) / (time.monotonic() - t)
    t = time.monotonic()
    for rid in native_ids:
        for targets in ([{"host": "127.0.0.1", "port": h.kernel_port}], []):
            a = http("PATCH", f"{h.url}/routes/{rid}", {"targets": targets}, native)
            expect(a.status == 200, f"native patch: {a}")
    base_calls = 2 * len(native_ids) / (time.monotonic() - t)
    results["backendai.route_calls.per_second"] = round(calls, 1)
    results["backendai.route_calls.native_baseline_per_second"] = round(base_calls, 1)
    results["backendai.route_calls.ratio"] = round(calls / base_calls, 2)

    # Create -> first proxied 200 through the real worker; baseline: a request
    # straight to the kernel.
    lat = []
    for i in range(20):
        t = time.monotonic()
        user, (ep,), _ = h.create_endpoints(1, f"lat-{i}")
        h.register_route(ep["deployment_id"])
        token = h.token(ep["deployment_id"], user)
        # Polled every 2 ms: the figure is the latency, not the poll's period.
        wait_for("first 200", lambda: proxied(ep["url"], token).status == 200, step=0.002)
        lat.append(time.monotonic() - t)
    direct = []
    for _ in range(20):
        t = time.monotonic()
        expect(http("GET", f"http://127.0.0.1:{h.kernel_port}/").status == 200, "kernel")
        direct.append(time.monotonic() - t)
    lat.sort()
    direct.sort()
    results["backendai.create_to_first_200.p50_ms"] = round(lat[len(lat) // 2] * 1000, 1)
    results["backendai.create_to_first_200.max_ms"] = round(lat[-1] * 1000, 1)
    results["backendai.create_to_first_200.kernel_direct_p50_ms"] = round(direct[len(direct) // 2] * 1000, 2)
    for k, v in results.items():
        log(f"{k} = {v}")
    if out_path:
        data = {"backendai": {}}
        for key, value in results.items():
            node = data
            *path, last = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value
        data["machine"] = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
        data["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        with open(out_path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        log(f"wrote {out_path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", action="store_true", help="measure instead of testing")
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "backendai.json"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--postgres",
        metavar="ADMIN_URL",
        help="with --bench: the coordinator on a scratch database of this PostgreSQL server "
        "(e.g. postgres://postgres@127.0.0.1:5432/postgres) instead of the embedded SQLite",
    )
    args = ap.parse_args()
    h = Harness(keep=args.keep)
    failed = True
    scratch = None
    try:
        if args.bench:
            if args.postgres:
                scratch = f"bench_backendai_{os.getpid()}"
                subprocess.run(["psql", "-q", args.postgres, "-c", f"CREATE DATABASE {scratch}"], check=True)
                h.database_url = args.postgres.rsplit("/", 1)[0] + f"/{scratch}?sslmode=disable"
            bench(h, args.results)
        else:
            scenario(h)
        failed = False
    finally:
        h.close(failed)
        if scratch:
            subprocess.run(["psql", "-q", args.postgres, "-c", f"DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"])


if __name__ == "__main__":
    main()

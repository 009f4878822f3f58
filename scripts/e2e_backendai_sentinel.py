#!/usr/bin/env python3
"""End to end: a Redis Sentinel failover under load, with the unmodified worker.

Starts a Redis primary, a replica and three sentinels (real `redis-server` and
Redis Sentinel, installed by scripts/redis-sentinel.sh when missing) on ports
of their own (16380-16381, 16390-16392) in a temporary directory, then this
coordinator with APPPROXY_REDIS_URL=redis+sentinel://…/e2e-sentinel (the event
bus, the live data in DB 2 and the Manager's core bus in DB 4, all through the
sentinels) and the unmodified Backend.AI worker with `[redis] sentinel` +
`service_name`, a stand-in kernel, and an interactive http app of a session.

While a Manager-like client keeps creating inference endpoints
(POST /v2/endpoints/bulk) and registering their routes (route updates, each
retried as the Manager does until it answers 200), the primary fails over
(SENTINEL FAILOVER). Then:

  - the coordinator was never restarted, and follows the new primary;
  - nothing acknowledged is lost: every endpoint whose create and route
    registration answered 200, before, during or after the failover, serves
    the kernel's page through the worker;
  - the Manager's core bus works through the new primary: the real producer
    (backend-ai-common's EventProducer, itself through the sentinels)
    announces the session's end and its app stops serving;
  - the gap is printed: from the failover's start to the first create
    answered 200 that was started after it, and to the first route update.

Uses the harness of scripts/e2e_backendai.py (same needs). Fails, saying so,
when Redis Sentinel cannot be installed.
"""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e_backendai import ROOT, Harness, Redis, expect, http, log, proxied, wait_for  # noqa: E402
from e2e_backendai_sessions import VENV, open_http  # noqa: E402

SERVICE = "e2e-sentinel"
PRIMARY, REPLICA = 16380, 16381
SENTINELS = (16390, 16391, 16392)
SENTINEL_LIST = ",".join(f"127.0.0.1:{p}" for p in SENTINELS)
WORKER = "e2e-sentinel-1"
BEFORE, AFTER = 4, 6  # endpoints acknowledged before the failover, and after it
PACE = 0.2  # seconds between two endpoints of the load (a Manager's pace, not a flood)
PORTS = 200  # the worker's port range: enough for every endpoint of the run
# The worker's own Valkey client notices a SIGKILLed primary only after three
# failed health checks (about 40-60 s here): deadlines well beyond that.
PATIENCE = 240.0

# The Manager's producer of session_terminated, through the sentinels.
PRODUCER = r"""
import asyncio, sys, uuid
from ai.backend.common.events.dispatcher import EventProducer
from ai.backend.common.events.event_types.session.anycast import SessionTerminatedAnycastEvent
from ai.backend.common.message_queue.redis_queue import RedisMQArgs, RedisQueue
from ai.backend.common.types import AgentId, HostPortPair, RedisTarget, SessionId

async def main(sentinels, service, session_id):
    target = RedisTarget(
        sentinel=[HostPortPair(h, int(p)) for h, p in (s.rsplit(":", 1) for s in sentinels.split(","))],
        service_name=service)
    mq = await RedisQueue.create(
        target,
        RedisMQArgs(anycast_stream_key="events", broadcast_channel="events_all",
                    consume_stream_keys=None, subscribe_channels=None,
                    group_name="manager", node_id="e2e-manager", db=4))
    producer = EventProducer(mq, source=AgentId("manager"))
    await producer.anycast_event(SessionTerminatedAnycastEvent(
        session_id=SessionId(uuid.UUID(session_id)), reason="user-requested"))
    await producer.close()

asyncio.run(main(*sys.argv[1:4]))
"""


def redis_binaries():
    """redis-server and redis-sentinel, installed by the project's script if
    missing; a clear failure otherwise (never a silent skip)."""
    script = os.path.join(ROOT, "scripts", "redis-sentinel.sh")
    r = subprocess.run(["bash", script], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        print(
            "e2e_backendai_sentinel: FAILED: Redis Sentinel is not installed and "
            "scripts/redis-sentinel.sh could not install it (see above)",
            file=sys.stderr,
        )
        sys.exit(1)
    return "redis-server"


def info(port, section):
    text = Redis(port=port).cmd("INFO", section)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def primary_per(sentinel_port):
    addr = Redis(port=sentinel_port).cmd("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
    return int(addr[1]) if addr else None


class Topology:
    """A primary, a replica and three sentinels, as processes of the harness."""

    def __init__(self, h, server):
        self.h, self.server = h, server
        self.dir = os.path.join(h.tmp, "redis")
        os.makedirs(self.dir, exist_ok=True)

    def start(self):
        for port, extra in ((PRIMARY, []), (REPLICA, ["--replicaof", "127.0.0.1", str(PRIMARY)])):
            data = os.path.join(self.dir, str(port))
            os.makedirs(data, exist_ok=True)
            self.h._spawn(
                f"redis-{port}",
                [self.server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", data, *extra],
            )
        wait_for("the replica in sync", lambda: self._up(REPLICA) and info(REPLICA, "replication").get("master_link_status") == "up")
        for port in SENTINELS:
            conf = os.path.join(self.dir, f"sentinel-{port}.conf")
            with open(conf, "w") as f:
                f.write(
                    f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {PRIMARY} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} 2000\n"
                    f"sentinel failover-timeout {SERVICE} 10000\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n"
                )
            self.h._spawn(f"sentinel-{port}", [self.server, conf, "--sentinel"])

        def known():
            for port in SENTINELS:
                if not self._up(port):
                    return False
                m = Redis(port=port).cmd("SENTINEL", "MASTER", SERVICE)
                m = dict(zip(m[::2], m[1::2]))
                if m.get("num-other-sentinels") != "2" or m.get("num-slaves") != "1":
                    return False
            return True

        wait_for("three sentinels that know the primary, the replica and each other", known)

    @staticmethod
    def _up(port):
        try:
            return Redis(port=port).cmd("PING") == "PONG"
        except OSError:
            return False


class Watcher:
    """A subscriber of our own on one server (subscribing again whenever
    Sentinel closes its connection): when the coordinator's created events
    reach that server directly."""

    def __init__(self, port):
        self.port = port
        self.heard = []  # when each created event of the coordinator came
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.done.is_set():
            try:
                r = Redis(port=self.port)
                r.sock.settimeout(1.0)
                r.cmd("SUBSCRIBE", "events_all-appproxy")
                while not self.done.is_set():
                    try:
                        kind, _channel, message = r._read()
                    except TimeoutError:
                        continue
                    if kind == "message" and '"appproxy_circuit_created_event"' in message:
                        self.heard.append(time.monotonic())
            except (OSError, ValueError):
                time.sleep(0.05)

    def first_after(self, t):
        return min((x for x in self.heard if x >= t), default=None)


class Load:
    """A Manager-like client: creates an endpoint, then registers its route,
    each call retried until it answers 200; records when each answered."""

    def __init__(self, h):
        self.h = h
        self.done = []  # (deployment, user, url, create answered at, route answered at)
        self.failures = []  # (what, when, answer)
        self.creates = []  # (started, answered, status)
        self.routes = []
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _until_ok(self, what, call, record):
        while True:
            started = time.monotonic()
            a = call()
            answered = time.monotonic()
            record.append((started, answered, a.status))
            if a.status == 200:
                return a, answered
            self.failures.append((what, started, a))
            time.sleep(0.1)

    def _run(self):
        try:
            i = 0
            while not self.stop.is_set():
                user, dep = str(uuid.uuid4()), str(uuid.uuid4())
                item = {
                    "deployment_id": dep,
                    "version": "v2",
                    "service_name": f"sentinel-{i}",
                    "tags": {
                        "session": {"user_uuid": user, "project_id": str(uuid.uuid4()), "domain_name": "default"},
                        "endpoint": {"id": dep, "runtime_variant": "custom", "existing_url": None},
                    },
                    "open_to_public": False,
                    "health_check": None,
                }
                a, created = self._until_ok(
                    "create",
                    lambda: self.h.manager("POST", "/v2/endpoints/bulk", {"endpoints": [item]}),
                    self.creates,
                )
                url = a.json["endpoints"][0]["url"]
                route = {
                    "endpoints": [
                        {
                            "deployment_id": dep,
                            "routes": [
                                {
                                    "session_id": str(uuid.uuid4()),
                                    "route_id": str(uuid.uuid4()),
                                    "kernel_host": "127.0.0.1",
                                    "kernel_port": self.h.kernel_port,
                                }
                            ],
                        }
                    ]
                }
                _, routed = self._until_ok(
                    "route",
                    lambda: self.h.manager("POST", "/v2/endpoints/bulk/routes/register", route),
                    self.routes,
                )
                self.done.append((dep, user, url, created, routed))
                i += 1
                self.stop.wait(PACE)
        except Exception as e:  # reported by the main thread
            self.error = e

    def count(self):
        return len(self.done)


class Prober:
    """What a user notices: when each acknowledged endpoint first serves the
    kernel's page through the worker (polled in order, each until it does)."""

    def __init__(self, h, load):
        self.h, self.load = h, load
        self.served = {}  # deployment -> when its URL first served
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            i = 0
            while True:
                if i >= len(self.load.done):
                    if not self.load.thread.is_alive() and i >= len(self.load.done):
                        return
                    time.sleep(0.05)
                    continue
                dep, user, url, _, _ = self.load.done[i]
                token = self.h.token(dep, user)
                wait_for(
                    f"{url} to serve the kernel",
                    lambda: b"hello from the kernel" in proxied(url, token).raw,
                    patience=PATIENCE,
                    step=0.05,
                )
                self.served[dep] = time.monotonic()
                i += 1
        except Exception as e:  # reported by the main thread
            self.error = e


def phase(h, load, prober, what, trigger, old, new, demoted=False):
    """Fails the primary `old` over to `new` by `trigger` while the load goes
    on; waits until the sentinels name `new` (and, `demoted`, until `old` is
    its replica: Sentinel then closes every client connection of `old`), then
    until AFTER endpoints created after that serve. Answers a function that
    describes the gap (called once every endpoint served)."""
    watcher = Watcher(new)
    time.sleep(0.2)  # subscribed (a missed early event only makes the gap look longer)
    started = time.monotonic()
    trigger()
    log(f"sentinel: {what} (:{old} -> :{new})")
    wait_for(f"the sentinels to name :{new} the primary", lambda: all(primary_per(p) == new for p in SENTINELS))
    switched = time.monotonic() - started
    log(f"sentinel: the sentinels name :{new} the primary {switched:.2f} s after the start")
    settled = time.monotonic()
    if demoted:
        wait_for(f":{old} a replica of :{new}", lambda: info(old, "replication").get("role") == "slave")
        settled = time.monotonic()
        log(f"sentinel: :{old} is a replica {settled - started:.2f} s after the start (its clients disconnected)")

    def created_after(since=started):
        return [(dep, routed) for dep, _, _, created, routed in load.done if created >= since]

    wait_for(
        f"{AFTER} endpoints created after that serving",
        lambda: load.error or prober.error or sum(dep in prober.served for dep, _ in created_after(settled)) >= AFTER,
        patience=PATIENCE,
    )
    expect(load.error is None and prober.error is None, f"the load failed: {load.error or prober.error!r}")

    # The coordinator publishes on the new primary itself (not through
    # replication from the old one): it follows the sentinels.
    published = wait_for("a created event published on the new primary", lambda: watcher.first_after(settled))
    watcher.done.set()

    def gap():
        after = created_after()
        first = min(prober.served[dep] for dep, _ in after)
        worst = max(prober.served[dep] - routed for dep, routed in after)
        return (
            f"sentinel: GAP ({what}): the sentinels named the new primary after {switched:.2f} s; the "
            f"coordinator published on it {published - started:.2f} s after the start; the first endpoint "
            f"created after the start served through the worker {first - started:.2f} s after it; longest "
            f"route registration -> serving among the {len(after)} created after it: {worst:.2f} s"
        )

    return gap


def scenario(h, server):
    h.authorities = [WORKER]
    Topology(h, server).start()
    sentinel_url = f"redis+sentinel://{SENTINEL_LIST}/{SERVICE}"
    log(f"sentinel: primary :{PRIMARY}, replica :{REPLICA}, sentinels {SENTINEL_LIST}")
    h.start_kernel()
    h.start_coordinator({"APPPROXY_REDIS_URL": sentinel_url})
    coordinator = h.procs["coordinator"]
    h.start_worker(
        "worker-1",
        WORKER,
        ports=PORTS,
        extra_config=["--redis-sentinel", SENTINEL_LIST, "--redis-service-name", SERVICE],
    )
    session = str(uuid.uuid4())
    app = open_http(h, session, str(uuid.uuid4()))
    log("sentinel: an interactive app serves through the worker (bus through the sentinels)")

    load = Load(h)
    prober = Prober(h, load)
    wait_for(f"{BEFORE} endpoints acknowledged before the failover", lambda: load.error or load.count() >= BEFORE)
    expect(load.error is None, f"the load failed: {load.error!r}")

    def sentinel_failover():
        expect(Redis(port=SENTINELS[0]).cmd("SENTINEL", "FAILOVER", SERVICE) == "OK", "SENTINEL FAILOVER")

    gaps = [
        phase(h, load, prober, "SENTINEL FAILOVER", sentinel_failover, old=PRIMARY, new=REPLICA, demoted=True),
        phase(h, load, prober, "SIGKILL of the primary", lambda: h.stop(f"redis-{REPLICA}", signal.SIGKILL), old=REPLICA, new=PRIMARY),
    ]
    load.stop.set()
    load.thread.join(timeout=120)
    expect(load.error is None, f"the load failed: {load.error!r}")
    prober.thread.join(timeout=300)
    expect(prober.error is None, f"an acknowledged endpoint does not serve: {prober.error!r}")
    expect(len(prober.served) == load.count(), f"served {len(prober.served)} of {load.count()}")
    log(f"sentinel: every one of the {load.count()} acknowledged endpoints serves through the worker")
    expect(coordinator.poll() is None and h.procs.get("coordinator") is coordinator, "the coordinator never restarted")
    failed = [(what, a.status) for what, _, a in load.failures]
    log(f"sentinel: Manager calls answered non-200 and retried: {len(failed)} {failed[:6]}")
    for gap in gaps:
        log(gap())
    cids = [h.circuit_id_of(dep) for dep, *_ in load.done]
    h.circuits.update(c for c in cids if c)

    log("sentinel: the Manager's core bus through the new primary: the session ends")
    subprocess.run(
        [os.path.join(VENV, "bin", "python"), "-c", PRODUCER, SENTINEL_LIST, SERVICE, session],
        check=True,
        timeout=120,
    )
    wait_for("the ended session's app to stop serving", lambda: proxied(app["url"], cookie=app["cookie"]).status != 200)
    health = h.manager("GET", "/health")
    expect(health.status == 200, f"/health after the failover: {health}")
    text = h.log_of("coordinator")
    expect("reached Redis again" in text, "the coordinator's loops reconnected (through the sentinels)")
    expect(coordinator.poll() is None, "the coordinator never restarted")
    log("sentinel: all passed")


def main():
    server = redis_binaries()
    h = Harness(keep="--keep" in sys.argv)
    failed = True
    try:
        scenario(h, server)
        failed = False
    finally:
        if failed:
            for port in (PRIMARY, REPLICA):
                try:
                    print(f"----- CLIENT LIST of :{port} -----\n{Redis(port=port).cmd('CLIENT', 'LIST')}")
                except OSError as e:
                    print(f"----- :{port}: {e}")
            for port in (PRIMARY, REPLICA, *SENTINELS):
                name = f"sentinel-{port}" if port in SENTINELS else f"redis-{port}"
                text = h.log_of(name)
                if text:
                    print(f"----- {name} log (last 1500 chars) -----\n{text[-1500:]}")
        h.close(failed)


if __name__ == "__main__":
    main()

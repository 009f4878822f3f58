#!/usr/bin/env python3
"""Lost bus events, with the unmodified Backend.AI App Proxy worker.

Each loss is made deterministic, not by timing: the worker is stopped
(SIGSTOP), its Redis subscriber connection is killed (`CLIENT KILL ID` of the
`CLIENT LIST` entry subscribed from one of the worker's own sockets), the
change is made, a subscriber of our own sees the PUBLISH the worker missed,
and only then does the worker continue (SIGCONT); it subscribes again about
three seconds later. Then:

  created   the Manager's first POST /v2/endpoints/bulk answers 200 (the
            created event is published again within the ack wait) and serves
  updated   a route moved to a second kernel: the new kernel answers within
            10 s of the worker's re-subscription
  removed   a bulk delete: the old URL stops serving within 10 s of it

Prints how long each repair took after the re-subscription.
"""

import json
import os
import signal
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e_backendai import (  # noqa: E402
    Harness,
    Redis,
    expect,
    free_port,
    http,
    log,
    proxied,
    wait_for,
)

WORKER = "e2e-loss-1"
BOUND = 10.0  # seconds from re-subscription to the change in effect


class Watcher:
    """Our own subscriber: every coordinator event, with when it came."""

    def __init__(self):
        self.redis = Redis()
        self.redis.sock.settimeout(None)
        self.redis.cmd("SUBSCRIBE", "events_all-appproxy")
        self.heard = []
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                kind, _channel, message = self.redis._read()
            except (OSError, ValueError):
                return
            if kind != "message":
                continue
            with self.lock:
                self.heard.append((time.monotonic(), json.loads(message)))

    def saw(self, name, since, check=lambda payload: True):
        with self.lock:
            for t, obj in self.heard:
                if t >= since and obj.get("name") == name and obj.get("source") == "appproxy-coordinator":
                    payload = json.loads(obj["payload"])
                    if payload.get("target_worker_authority") == WORKER and check(payload):
                        return True
        return False


def socket_ports(pgid):
    """Local TCP ports of every socket the processes of group `pgid` hold."""
    inodes = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            for fd in os.listdir(f"/proc/{d}/fd"):
                link = os.readlink(f"/proc/{d}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except (OSError, IndexError, ValueError):
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[9] in inodes:
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def subscribers_of(h, pgid):
    """The Redis client ids subscribed from the worker's own sockets."""
    ports = socket_ports(pgid)
    ids = []
    for line in h.redis.cmd("CLIENT", "LIST").splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        port = int(f["addr"].rsplit(":", 1)[1])
        if port in ports and (int(f.get("sub", 0)) > 0 or int(f.get("psub", 0)) > 0):
            ids.append(f["id"])
    return ids


def lose(h, watcher, event, change, check=lambda payload: True):
    """Makes the worker miss `event` published by `change()`; answers when
    the worker subscribed again (monotonic time) and what `change` answered."""
    pgid = h.procs["worker"].pid
    expect(subscribers_of(h, pgid), "the worker's subscriber connection")
    os.killpg(pgid, signal.SIGSTOP)
    try:
        for cid in subscribers_of(h, pgid):
            h.redis.cmd("CLIENT", "KILL", "ID", cid)
        expect(not subscribers_of(h, pgid), "the worker's subscriber is gone")
        since = time.monotonic()
        out = {}
        t = threading.Thread(target=lambda: out.update(answer=change()), daemon=True)
        t.start()
        wait_for(f"the {event} the worker misses", lambda: watcher.saw(event, since, check))
    finally:
        os.killpg(pgid, signal.SIGCONT)
    wait_for("the worker to subscribe again", lambda: subscribers_of(h, pgid), step=0.05)
    resubscribed = time.monotonic()
    t.join(timeout=60)
    expect(not t.is_alive(), f"the change answered ({event})")
    return resubscribed, out.get("answer")


def second_kernel(h):
    www = os.path.join(h.tmp, "www2")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "index.html"), "w") as f:
        f.write("hello from the second kernel\n")
    port = free_port()
    h._spawn("kernel2", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=www)
    wait_for("the second kernel", lambda: http("GET", f"http://127.0.0.1:{port}/").status == 200)
    return port


def route_to(h, deployment, port):
    rid = str(uuid.uuid4())
    a = h.manager(
        "POST",
        "/v2/endpoints/bulk/routes/register",
        {"endpoints": [{"deployment_id": deployment, "routes": [
            {"session_id": str(uuid.uuid4()), "route_id": rid, "kernel_host": "127.0.0.1", "kernel_port": port}
        ]}]},
    )
    expect(a.status == 200 and a.json["endpoints"][0]["success"], f"register: {a}")
    return rid


def scenario(h):
    h.authorities = [WORKER]
    h.start_kernel()
    # Heartbeats stop while the worker is stopped: a long timeout keeps it
    # Ready (this is about lost messages, not lost workers).
    h.start_coordinator({"APPPROXY_HEARTBEAT_TIMEOUT": "60s"})
    h.start_worker("worker", WORKER)
    watcher = Watcher()
    times = {}

    log("created: the worker misses the created event of a bulk create")
    created = {}

    def create():
        user, (ep,), _ = h.create_endpoints(1, "lost-created")
        created.update(user=user, ep=ep)
        return ep

    resub, ep = lose(h, watcher, "appproxy_circuit_created_event", create)
    expect(ep and ep["url"], f"the first attempt answered 200 with a URL: {ep}")
    times["created"] = time.monotonic() - resub
    dep, url = ep["deployment_id"], ep["url"]
    first = route_to(h, dep, h.kernel_port)
    token = h.token(dep, created["user"])
    wait_for("200 through the worker", lambda: proxied(url, token).status == 200)
    h.circuits.add(h.circuit_id_of(dep))

    log("updated: the worker misses a route update (the route moves to a second kernel)")
    port2 = second_kernel(h)

    def move():
        route_to(h, dep, port2)
        h.unregister_route(dep, first)

    def only_second(payload):
        return [r["kernel_port"] for r in payload.get("routes", [])] == [port2]

    resub, _ = lose(h, watcher, "appproxy_circuit_route_updated_event", move, only_second)
    wait_for(
        "the second kernel to answer",
        lambda: b"second kernel" in (proxied(url, token).raw or b""),
        patience=BOUND + 30,
        step=0.1,
    )
    times["route_updated"] = time.monotonic() - resub
    expect(times["route_updated"] <= BOUND, f"route update repaired in {times['route_updated']:.1f} s")

    log("removed: the worker misses the removal of a bulk delete")

    def delete():
        a = h.manager("DELETE", "/v2/endpoints/bulk", {"endpoints": [{"deployment_id": dep}]})
        expect(a.status == 200 and a.json["endpoints"][0]["success"], f"bulk delete: {a}")

    resub, _ = lose(h, watcher, "appproxy_circuit_removed_event", delete)
    wait_for("the old URL to stop serving", lambda: proxied(url, token).status != 200, patience=BOUND + 30, step=0.1)
    times["removed"] = time.monotonic() - resub
    expect(times["removed"] <= BOUND, f"removal repaired in {times['removed']:.1f} s")
    for k, v in times.items():
        log(f"{k}: in effect {v:.1f} s after the worker subscribed again")
    log("all passed")


def main():
    h = Harness(keep="--keep" in sys.argv)
    failed = True
    try:
        scenario(h)
        failed = False
    finally:
        if failed:
            text = h.log_of("worker")
            if text:
                print(f"----- worker log (last 4000 chars) -----\n{text[-4000:]}")
        h.close(failed)


if __name__ == "__main__":
    main()

"""The Backend.AI create path against its real bound, for `make bench-backendai`.

worker_in_flight the real worker without any coordinator, kept at 16 created
                 events in flight (the next published when one is acknowledged),
                 as 16 Manager clients keep it: the ceiling a 16-client create
                 run is compared with.
worker_ceiling   what the real worker can take without any coordinator: created
                 events published straight to Redis at increasing rates, each
                 acknowledgement timed (publish -> the worker's added event),
                 then removed again. The ceiling is the best acknowledged
                 circuits/s of the steps.
creates          the Manager's creates alone (POST /v2/endpoints/bulk, one endpoint
                 each, answered after the worker's ack) from `clients` threads:
                 creates/s and latency, the figure the ceiling bounds; the
                 endpoints are deleted afterwards, untimed.
create_delete    the Manager's create (POST /v2/endpoints/bulk, answered after the
                 worker's ack) then delete (DELETE /v2/endpoints/bulk) through the
                 coordinator, from `clients` threads with the harness's Python
                 client; pairs/s and create latency.
"""

import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from e2e_backendai import Redis, expect, wait_for


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else 0.0


class _Acks:
    """Times each circuit's acknowledgement on the bus (`at`, by circuit id)
    and each created event the coordinator publishes (`created`, by endpoint
    id: the circuit id and when)."""

    def __init__(self, authority):
        self.authority = authority
        self.at = {}
        self.created = {}
        self.lock = threading.Lock()
        self.r = Redis()
        self.r.sock.settimeout(None)
        self.r.cmd("SUBSCRIBE", "events_all-appproxy")
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                kind, _, message = self.r._read()
            except (OSError, ValueError):
                return
            if kind != "message":
                continue
            now = time.monotonic()
            env = json.loads(message)
            if env.get("name") == "appproxy_circuit_created_event":
                payload = json.loads(env["payload"])
                with self.lock:
                    for c in payload["circuits"]:
                        if c.get("endpoint_id"):
                            self.created.setdefault(c["endpoint_id"], (c["id"], now))
                continue
            if env.get("name") != "appproxy_worker_circuit_added_event":
                continue
            payload = json.loads(env["payload"])
            if payload.get("target_worker_authority") != self.authority:
                continue
            with self.lock:
                for c in payload["circuits"]:
                    self.at.setdefault(c["id"], now)

    def count(self, ids):
        with self.lock:
            return sum(1 for i in ids if i in self.at)


def _circuit(worker_id, port, kernel_port):
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "id": str(uuid.uuid4()), "app": "ceiling", "protocol": "http", "worker": worker_id,
        "app_mode": "inference", "frontend_mode": "port", "envs": {}, "arguments": None,
        "open_to_public": False, "allowed_client_ips": None, "port": port, "subdomain": None,
        "user_id": str(uuid.uuid4()), "endpoint_id": str(uuid.uuid4()), "runtime_variant": "custom",
        "route_info": [{"route_id": str(uuid.uuid4()), "session_id": str(uuid.uuid4()), "session_name": None,
                        "kernel_host": "127.0.0.1", "kernel_port": kernel_port, "protocol": "http",
                        "traffic_ratio": 1.0}],
        "session_ids": [], "created_at": now, "updated_at": now,
    }


def _event(name, authority, circuit):
    return json.dumps({
        "name": name, "source": "appproxy-coordinator",
        "payload": json.dumps({"target_worker_authority": authority, "circuits": [circuit]}),
        "metadata": json.dumps({"request_id": None, "user": None, "triggered_user": None, "traceparent": None}),
    })


def _remove_all(h, pub, acks, authority, worker, circuits, marker_port):
    """Removes `circuits` from the worker and waits until it handled that."""
    for c in circuits:
        pub.cmd("PUBLISH", "events_all-appproxy", _event("appproxy_circuit_removed_event", authority, c))
    # The worker handles the bus in order: once a created event published
    # after the removals is acknowledged, they are behind it.
    marker = _circuit(worker["id"], marker_port, h.kernel_port)
    pub.cmd("PUBLISH", "events_all-appproxy", _event("appproxy_circuit_created_event", authority, marker))
    wait_for("the removals handled", lambda: acks.count([marker["id"]]) == 1, patience=120)
    pub.cmd("PUBLISH", "events_all-appproxy", _event("appproxy_circuit_removed_event", authority, marker))


def worker_ceiling(h, authority, ports, rates=(50, 100, 200, 400, None), per_step=120):
    """Created events straight to Redis at each rate (None: as fast as one
    connection publishes); answers the steps and the best circuits/s."""
    a = h.manager("GET", "/api/worker")
    expect(a.status == 200, f"workers: {a}")
    (worker,) = [w for w in a.json["workers"] if w["authority"] == authority]
    acks = _Acks(authority)
    pub = Redis()
    lo, hi = ports
    expect(hi - lo >= per_step, "enough ports for a step and a marker")
    steps = []
    for rate in rates:
        circuits = [_circuit(worker["id"], lo + i, h.kernel_port) for i in range(per_step)]
        ids = [c["id"] for c in circuits]
        sent = {}
        cpu0 = _cpu(h)["worker"]
        t0 = time.monotonic()
        for i, c in enumerate(circuits):
            if rate:
                pause = t0 + i / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            sent[c["id"]] = time.monotonic()
            pub.cmd("PUBLISH", "events_all-appproxy", _event("appproxy_circuit_created_event", authority, c))
        wait_for(f"{per_step} acknowledgements at {rate or 'full'}/s", lambda: acks.count(ids) == per_step, patience=120)
        with acks.lock:
            lat = [acks.at[i] - sent[i] for i in ids]
            last = max(acks.at[i] for i in ids)
        worker_cpu = _cpu(h)["worker"] - cpu0
        steps.append({
            "worker_cpu_ms_per_event": round(worker_cpu * 1000 / per_step, 2),
            "offered_per_second": rate or "max",
            "acked_per_second": round(per_step / (last - t0), 1),
            "ack_p50_ms": round(_pct(lat, 0.5) * 1000, 1),
            "ack_p99_ms": round(_pct(lat, 0.99) * 1000, 1),
        })
        _remove_all(h, pub, acks, authority, worker, circuits, hi)
    return steps, max(s["acked_per_second"] for s in steps)


def _endpoint(i, prefix):
    dep = str(uuid.uuid4())
    return {
        "deployment_id": dep, "version": "v2", "service_name": f"{prefix}-{i}",
        "tags": {"session": {"user_uuid": str(uuid.uuid4()), "project_id": str(uuid.uuid4()),
                             "domain_name": "default"},
                 "endpoint": {"id": dep, "runtime_variant": "custom", "existing_url": None}},
        "open_to_public": False, "health_check": None,
    }


def _group_cpu(pgid):
    """CPU seconds (user + system) of every process in group `pgid`."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _cpu(h):
    """CPU seconds so far of the coordinator, the workers and this client."""
    own = os.times()
    workers = sum(_group_cpu(p.pid) for name, p in h.procs.items() if name.startswith("worker"))
    return {
        "coordinator": _group_cpu(h.procs["coordinator"].pid),
        "worker": workers,
        "client": own.user + own.system,
    }


def creates(h, clients, n):
    """`n` creates of one endpoint each from `clients` threads; creates/s,
    their latency, and the CPU time each took in the coordinator, the worker
    and the client (a figure the machine's load barely moves). Deletes them
    afterwards (not timed)."""
    lat = []
    deps = []
    # Where each create's time went: request -> created event published
    # (the coordinator), -> acknowledged (the worker and Redis), -> answered
    # (the coordinator and the client).
    parts = {"to_publish": [], "to_ack": [], "to_answer": []}
    lock = threading.Lock()
    bus = _Acks(h.authorities[0])

    def one(i):
        item = _endpoint(i, "create")
        t = time.monotonic()
        a = h.manager("POST", "/v2/endpoints/bulk", {"endpoints": [item]})
        done = time.monotonic()
        expect(a.status == 200, f"create: {a}")
        with lock:
            lat.append(done - t)
            deps.append(item["deployment_id"])
        with bus.lock:
            circuit, published = bus.created.get(item["deployment_id"], (None, None))
            acked = bus.at.get(circuit)
        if published is not None and acked is not None:
            with lock:
                parts["to_publish"].append(published - t)
                parts["to_ack"].append(acked - published)
                parts["to_answer"].append(done - acked)

    cpu0 = _cpu(h)
    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(n)))
    elapsed = time.monotonic() - t0
    cpu1 = _cpu(h)
    for i in range(0, len(deps), 50):
        d = h.manager("DELETE", "/v2/endpoints/bulk", {"endpoints": [{"deployment_id": x} for x in deps[i:i + 50]]})
        expect(d.status == 200 and all(e["success"] for e in d.json["endpoints"]), f"delete: {d}")
    return {
        "creates_per_second": round(n / elapsed, 1),
        "create_p50_ms": round(_pct(lat, 0.5) * 1000, 1),
        "create_p99_ms": round(_pct(lat, 0.99) * 1000, 1),
        **{f"cpu_ms_per_create_{k}": round((cpu1[k] - cpu0[k]) * 1000 / n, 2) for k in cpu0},
        **{f"{k}_p50_ms": round(_pct(v, 0.5) * 1000, 1) for k, v in parts.items()},
        **{f"{k}_p99_ms": round(_pct(v, 0.99) * 1000, 1) for k, v in parts.items()},
        "timed_parts": len(parts["to_ack"]),
    }


def worker_in_flight(h, authority, ports, window=16, n=120):
    """What the real worker takes with `window` created events in flight at
    a time, as `window` Manager clients keep it: the next is published when
    one is acknowledged. Answers circuits/s and ack latency."""
    a = h.manager("GET", "/api/worker")
    expect(a.status == 200, f"workers: {a}")
    (worker,) = [w for w in a.json["workers"] if w["authority"] == authority]
    acks = _Acks(authority)
    pub = Redis()
    lo, hi = ports
    expect(hi - lo >= n, "enough ports")
    circuits = [_circuit(worker["id"], lo + i, h.kernel_port) for i in range(n)]
    ids = [c["id"] for c in circuits]
    sent = {}
    cpu0 = _cpu(h)["worker"]
    t0 = time.monotonic()
    i = 0
    while True:
        done = acks.count(ids)
        if done == n:
            break
        if i < n and i - done < window:
            c = circuits[i]
            sent[c["id"]] = time.monotonic()
            pub.cmd("PUBLISH", "events_all-appproxy", _event("appproxy_circuit_created_event", authority, c))
            i += 1
            continue
        expect(time.monotonic() - t0 < 120, "the worker stopped acknowledging")
        time.sleep(0.0005)
    worker_cpu = _cpu(h)["worker"] - cpu0
    with acks.lock:
        lat = [acks.at[x] - sent[x] for x in ids]
        last = max(acks.at[x] for x in ids)
    _remove_all(h, pub, acks, authority, worker, circuits, hi)
    return {
        "in_flight": window,
        "acked_per_second": round(n / (last - t0), 1),
        "ack_p50_ms": round(_pct(lat, 0.5) * 1000, 1),
        "ack_p99_ms": round(_pct(lat, 0.99) * 1000, 1),
        "worker_cpu_ms_per_event": round(worker_cpu * 1000 / n, 2),
    }


def create_delete(h, clients, pairs):
    """`pairs` create+delete pairs from `clients` threads; pairs/s and the
    creates' latency."""
    lat = []
    lock = threading.Lock()

    def one(i):
        item = _endpoint(i, "pair")
        dep = item["deployment_id"]
        t = time.monotonic()
        a = h.manager("POST", "/v2/endpoints/bulk", {"endpoints": [item]})
        took = time.monotonic() - t
        expect(a.status == 200, f"create: {a}")
        d = h.manager("DELETE", "/v2/endpoints/bulk", {"endpoints": [{"deployment_id": dep}]})
        expect(d.status == 200 and d.json["endpoints"][0]["success"], f"delete: {d}")
        with lock:
            lat.append(took)

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(pairs)))
    elapsed = time.monotonic() - t0
    return {
        "pairs_per_second": round(pairs / elapsed, 1),
        "create_p50_ms": round(_pct(lat, 0.5) * 1000, 1),
        "create_p99_ms": round(_pct(lat, 0.99) * 1000, 1),
    }

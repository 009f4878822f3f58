#!/usr/bin/env python3
"""What the Backend.AI anti-entropy sweep costs Redis at 10,000 circuits.

Starts a Redis server of its own (so every command counted is the
coordinator's), the coordinator in Backend.AI mode with
--backendai-resync-period=60s, registers one wildcard Backend.AI worker
(PUT /api/worker), plays that worker's acknowledgements on the bus, and
creates 10,000 circuits on it through the native API. Once every created
event is acknowledged and the re-publishes have stopped, it measures one
whole sweep period: PUBLISH calls and Redis CPU time in them
(INFO commandstats), bytes into and out of Redis (INFO stats), the events a
subscriber heard and their size, and the coordinator's CPU time. Writes
bench/backendai-resend.json.

Usage: APPPROXY_COORDINATOR_BIN=target/release/appproxy-coordinator \
         python3 scripts/bench_backendai_resend.py [--circuits N] [--period S]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e_backendai import API_SECRET, JWT_SECRET, ROOT, Redis, expect, free_port, http, log, wait_for  # noqa: E402

WORKER = "bench-resend-1"


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def info(r, section):
    out = {}
    for line in r.cmd("INFO", section).splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v
    return out


class Bus:
    """Plays the worker (acknowledges every created event for it) and
    counts what the coordinator publishes."""

    def __init__(self, port):
        self.port = port
        self.acked = set()
        self.heard = {}  # event name -> [count, bytes]
        self.lock = threading.Lock()
        self.sub = Redis(port=port)
        self.sub.sock.settimeout(None)
        self.sub.cmd("SUBSCRIBE", "events_all-appproxy")
        self.pub = Redis(port=port)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                kind, _, message = self.sub._read()
            except (OSError, ValueError):
                return
            if kind != "message":
                continue
            env = json.loads(message)
            if env.get("source") != "appproxy-coordinator":
                continue
            with self.lock:
                c = self.heard.setdefault(env["name"], [0, 0])
                c[0] += 1
                c[1] += len(message.encode())
            if env["name"] == "appproxy_circuit_created_event":
                added = {"name": "appproxy_worker_circuit_added_event", "source": "appproxy-worker",
                         "payload": env["payload"], "metadata": env.get("metadata")}
                self.pub.cmd("PUBLISH", "events_all-appproxy", json.dumps(added))
                for c in json.loads(env["payload"])["circuits"]:
                    self.acked.add(c["id"])

    def snapshot(self):
        with self.lock:
            return {k: list(v) for k, v in self.heard.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--circuits", type=int, default=10_000)
    ap.add_argument("--period", type=int, default=60, help="the sweep period measured, seconds")
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "backendai-resend.json"))
    args = ap.parse_args()
    binary = os.path.abspath(os.environ.get("APPPROXY_COORDINATOR_BIN") or os.path.join(ROOT, "target", "release", "appproxy-coordinator"))
    expect(os.path.exists(binary), f"no coordinator at {binary} (make build)")
    tmp = tempfile.mkdtemp(prefix="bench-resend-")
    procs = []
    try:
        rport = free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, cwd=tmp))
        wait_for("redis", lambda: _ping(rport))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ,
               "APPPROXY_BIND": f"127.0.0.1:{port}", "APPPROXY_DATA_DIR": os.path.join(tmp, "data"),
               "APPPROXY_KUBERNETES": "false", "APPPROXY_BACKENDAI_API_SECRET": API_SECRET,
               "APPPROXY_BACKENDAI_JWT_SECRET": JWT_SECRET, "APPPROXY_REDIS_URL": f"redis://127.0.0.1:{rport}",
               "APPPROXY_ADVERTISED_URL": url, "APPPROXY_BACKENDAI_RESYNC_PERIOD": f"{args.period}s",
               "APPPROXY_HEARTBEAT_TIMEOUT": "1h", "RUST_LOG": "warn"}
        log_file = open(os.path.join(tmp, "coordinator.log"), "ab")
        coord = subprocess.Popen([binary], env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp)
        procs.append(coord)
        wait_for("the coordinator", lambda: http("GET", f"{url}/readyz").status == 200)
        bus = Bus(rport)
        a = http("PUT", f"{url}/api/worker", {
            "authority": WORKER, "protocol": "http", "hostname": "127.0.0.1", "tls_listen": False,
            "tls_advertised": False, "api_port": 10201, "frontend_mode": "wildcard",
            "wildcard_domain": "apps.example.com", "wildcard_traffic_port": 443, "filtered_apps_only": False,
            "traefik_last_used_marker_path": None, "accepted_traffics": ["interactive", "inference"],
            "app_filters": []}, {"X-BackendAI-Token": API_SECRET})
        expect(a.status == 200, f"register: {a}")
        worker_id = a.json["id"]
        with open(os.path.join(tmp, "data", "manager.token")) as f:
            manager = {"Authorization": f"Bearer {f.read().strip()}"}

        def create(i):
            body = {"session_id": str(uuid.uuid4()), "service": f"app-{i}",
                    "targets": [{"host": "10.0.1.7", "port": 8888}], "worker_id": worker_id,
                    "circuit": {"user_id": str(uuid.uuid4()), "session_ids": []}}
            r = http("POST", f"{url}/routes", body, manager)
            expect(r.status == 201, f"create: {r}")

        log(f"creating {args.circuits} circuits")
        t = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(args.circuits)))
        log(f"created in {time.monotonic() - t:.1f} s")
        wait_for("every created event acknowledged", lambda: len(bus.acked) >= args.circuits, patience=300)
        # Settle: a sweep started while creating ends, re-publishes stop.
        redis = Redis(port=rport)
        quiet = args.period + 5
        log(f"settling for {quiet} s")
        time.sleep(quiet)
        redis.cmd("CONFIG", "RESETSTAT")
        before = bus.snapshot()
        cpu0 = cpu_seconds(coord.pid)
        log(f"measuring one sweep period ({args.period} s)")
        time.sleep(args.period)
        cpu1 = cpu_seconds(coord.pid)
        after = bus.snapshot()
        cmd = info(redis, "commandstats").get("cmdstat_publish", "calls=0,usec=0")
        publish = dict(kv.split("=") for kv in cmd.split(","))
        stats = info(redis, "stats")
        events = {k: [after[k][0] - before.get(k, [0, 0])[0], after[k][1] - before.get(k, [0, 0])[1]] for k in after}
        updated = events.get("appproxy_circuit_route_updated_event", [0, 0])
        results = {
            "circuits": args.circuits,
            "period_seconds": args.period,
            "route_updated_events": updated[0],
            "route_updated_mean_bytes": round(updated[1] / max(updated[0], 1)),
            "publish_calls": int(publish["calls"]),
            "publish_calls_per_second": round(int(publish["calls"]) / args.period, 1),
            "redis_publish_cpu_ms": round(int(publish["usec"]) / 1000, 1),
            "redis_net_input_bytes_per_second": round(int(stats["total_net_input_bytes"]) / args.period),
            "redis_net_output_bytes_per_second": round(int(stats["total_net_output_bytes"]) / args.period),
            "coordinator_cpu_seconds": round(cpu1 - cpu0, 2),
            "other_events": {k: v[0] for k, v in events.items() if k != "appproxy_circuit_route_updated_event"},
        }
        for k, v in results.items():
            log(f"{k} = {v}")
        with open(args.results, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
            f.write("\n")
        log(f"wrote {args.results}")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _ping(port):
    try:
        return Redis(port=port).cmd("PING") == "PONG"
    except OSError:
        return False


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""End to end: dedicated workers and the /health details, with the real worker.

Two unmodified Backend.AI App Proxy workers against this coordinator: one
plain, one with `filtered_apps_only = true` (the stock worker 26.9.6 cannot
send a non-empty `app_filters`: it fails to serialise them, so a filtered
worker without filters is what it can run; such a worker takes no circuit).

  placement  every endpoint lands on the plain worker; one is served through
             it (200 with a token)
  health     /health/summary, /health/endpoints and /health/circuits/{id}
             report both workers and the circuits healthy once the worker
             acknowledged them
  dedicated  with the plain worker gone, a new endpoint is upstream's 503
             worker-not-available (the filtered worker does not take it) and
             the old circuits are reported unhealthy and stranded

Run by `make e2e-backendai` after the main scenario; needs what it needs.
"""

import os
import signal
import subprocess
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e_backendai import (  # noqa: E402
    API_SECRET,
    JWT_SECRET,
    PERMIT_SECRET,
    REDIS,
    Harness,
    expect,
    free_port,
    free_range,
    http,
    log,
    proxied,
    wait_for,
)

PLAIN = "e2e-filters-plain"
ONLY = "e2e-filters-only"


def start_filtered_worker(h, name, authority):
    """Starts a worker whose config says `filtered_apps_only = true`."""
    lo, hi = free_range(10)
    cfg = os.path.join(h.tmp, name, "worker.toml")
    subprocess.run(
        [
            h.worker_script, "config", cfg,
            "--coordinator", h.url,
            "--authority", authority,
            "--api-port", str(free_port()),
            "--port-range", f"{lo}-{hi}",
            "--redis", REDIS,
            "--api-secret", API_SECRET,
            "--jwt-secret", JWT_SECRET,
            "--permit-secret", PERMIT_SECRET,
            "--heartbeat", "1.0",
            "--aiomonitor-port", str(free_port()),
            "--ipc-dir", os.path.join(h.tmp, name, "ipc"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with open(cfg) as f:
        text = f.read()
    expect("\naccepted_traffics = " in text, f"unexpected worker config:\n{text}")
    text = text.replace("\naccepted_traffics = ", "\nfiltered_apps_only = true\naccepted_traffics = ", 1)
    with open(cfg, "w") as f:
        f.write(text)
    h._spawn(name, [h.worker_script, "run", cfg], cwd=os.path.join(h.tmp, name))
    wait_for(f"worker {name} to start", lambda: h._worker_started(name))
    return (lo, hi)


def port_of(url):
    return int(url.rstrip("/").rsplit(":", 1)[1])


def health(h, path):
    a = h.manager("GET", path)
    expect(a.status == 200 and a.json["success"] is True, f"{path}: {a}")
    return a.json


def scenario(h):
    h.authorities = [PLAIN, ONLY]
    h.start_kernel()
    h.start_coordinator()
    plain = h.start_worker("worker-plain", PLAIN)
    only_range = start_filtered_worker(h, "worker-only", ONLY)
    workers = {w["authority"]: w for w in h.manager("GET", "/api/worker").json["workers"]}
    expect(workers[ONLY]["filtered_apps_only"] is True, f"registered as: {workers[ONLY]}")
    expect(workers[PLAIN]["filtered_apps_only"] is False, f"registered as: {workers[PLAIN]}")

    log("placement: every endpoint goes to the plain worker")
    user, created, _ = h.create_endpoints(4, "filtered")
    lo, hi = plain["range"]
    for ep in created:
        port = port_of(ep["url"])
        expect(lo <= port <= hi, f"{ep['url']} is not on the plain worker {plain['range']} (filtered: {only_range})")
        h.circuits.add(h.circuit_id_of(ep["deployment_id"]))
    served = created[0]
    h.register_route(served["deployment_id"])
    token = h.token(served["deployment_id"], user)
    wait_for("200 through the plain worker", lambda: proxied(served["url"], token).status == 200)

    log("health: the workers and the circuits, as the real worker acknowledged them")

    def all_healthy():
        s = health(h, "/health/summary")["summary"]
        return s["healthy_circuits"] == 4 and s["total_endpoints"] == 4 and s
    summary = wait_for("4 healthy circuits", all_healthy)
    statuses = {w["authority"]: w["status"] for w in summary["workers"]}
    expect(statuses == {PLAIN: "Ready", ONLY: "Ready"}, f"workers: {summary['workers']}")
    expect(summary["healthy_routes"] == 1 and summary["stranded_circuits"] == 0, f"summary: {summary}")
    endpoints = health(h, "/health/endpoints")["endpoints"]
    mine = [e for e in endpoints if e["endpoint_id"] == served["deployment_id"]]
    expect(len(mine) == 1 and mine[0]["worker"] == PLAIN and mine[0]["url"] == served["url"], f"{mine}")
    expect(mine[0]["routes"][0]["health_status"] == "healthy", f"{mine}")
    cid = h.circuit_id_of(served["deployment_id"])
    circuit = health(h, f"/health/circuits/{cid}")["circuits"][0]
    expect(circuit["status"] == "Active" and circuit["healthy"] is True, f"{circuit}")
    expect(http("GET", f"{h.url}/health/summary").status == 401, "the summary needs the api_secret")

    log("dedicated: without the plain worker nothing lands on the filtered one")
    h.stop("worker-plain", signal.SIGKILL)
    mt = h.manager_token()

    def plain_lost():
        a = http("GET", f"{h.url}/workers", headers={"Authorization": f"Bearer {mt}"})
        return any(w["name"] == PLAIN and w["status"] == "Lost" for w in (a.json or {}).get("items", []))

    wait_for("the plain worker to be Lost", plain_lost)
    dep = str(uuid.uuid4())
    item = {
        "deployment_id": dep, "version": "v2", "service_name": "nowhere",
        "tags": {
            "session": {"user_uuid": user, "project_id": user, "domain_name": "default"},
            "endpoint": {"id": dep, "runtime_variant": "custom", "existing_url": None},
        },
        "open_to_public": False, "health_check": None,
    }
    a = h.manager("POST", "/v2/endpoints/bulk", {"endpoints": [item]})
    expect(a.status == 503 and a.json["type"].endswith("appproxy/worker-not-available"), f"create: {a}")
    expect(h.circuit_id_of(dep) is None, "nothing created")

    def stranded():
        s = health(h, "/health/summary")["summary"]
        return s["stranded_circuits"] == 4 and s["unhealthy_circuits"] == 4 and s
    wait_for("the 4 circuits stranded on the lost worker", stranded)
    log("all passed")


def main():
    h = Harness()
    failed = True
    try:
        scenario(h)
        failed = False
    finally:
        for name in ("worker-plain", "worker-only"):
            text = h.log_of(name) if failed else ""
            if text:
                print(f"----- {name} log (last 3000 chars) -----\n{text[-3000:]}")
        h.close(failed)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""End to end: a worker that dies for good, with two unmodified Backend.AI workers.

Starts this coordinator, worker A and a stand-in kernel (the harness of
scripts/e2e_backendai.py), creates an inference endpoint as the Manager does
(bulk create, register a route to the kernel, an endpoint token) and serves it
through A. Starts worker B on other ports (so no worker keeps A's URL), then
SIGKILLs A for good and checks, once A is Lost:

  /health/status     `workers` lists only B; A is under `unavailable_workers`
                     (Lost) and its circuit under `stranded_circuits`
  /api/circuit/{id}  says `"status": "worker_lost"`
  re-sync            the Manager's `POST /v2/endpoints/bulk` with
                     `existing_url` = the old URL answers 200 with a URL on B,
                     which serves 200 through B with a new endpoint token; the
                     circuit is `active` on B and no longer stranded

Run by `make e2e-backendai` after the main scenario; on its own:
`python3 scripts/e2e_backendai_recovery.py` (same needs as the main one).
"""

import os
import signal
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e_backendai import Harness, expect, http, log, proxied, wait_for  # noqa: E402

A, B = "e2e-recovery-a", "e2e-recovery-b"


def health_status(h):
    a = h.manager("GET", "/health/status")
    expect(a.status == 200, f"/health/status: {a}")
    return a.json


def circuit(h, cid):
    a = h.manager("GET", f"/api/circuit/{cid}")
    expect(a.status == 200, f"/api/circuit/{cid}: {a}")
    return a.json


def port_of(url):
    return urllib.parse.urlsplit(url).port


def scenario(h):
    h.authorities = [A, B]
    h.start_kernel()
    h.start_coordinator()
    h.start_worker("worker-1", A)

    log("recovery: an inference endpoint served through worker A")
    user, (ep,), items = h.create_endpoints(1, "recover")
    dep, url = ep["deployment_id"], ep["url"]
    h.register_route(dep)
    token = h.token(dep, user)
    wait_for("200 through worker A", lambda: proxied(url, token).status == 200)
    cid = h.circuit_id_of(dep)
    h.circuits.add(cid)
    expect(circuit(h, cid)["status"] == "active", f"active on A: {circuit(h, cid)}")

    wb = h.start_worker("worker-2", B)
    lo, hi = wb["range"]
    expect(not lo <= port_of(url) <= hi, f"B's ports {lo}-{hi} must not hold A's URL {url}")
    log(f"recovery: worker B serves ports {lo}-{hi}; SIGKILL worker A for good")
    h.stop("worker-1", signal.SIGKILL)

    def a_lost():
        s = health_status(h)
        return any(w["authority"] == A and w["status"] == "Lost" for w in s["unavailable_workers"]) and s

    s = wait_for("worker A to be Lost", a_lost)
    serving = [w["authority"] for w in s["workers"]]
    expect(serving == [B], f"/health/status lists only B under workers: {s}")
    c = circuit(h, cid)
    expect(c["status"] == "worker_lost", f"the circuit says its worker is lost: {c}")
    s = wait_for(
        "the circuit reported stranded",
        lambda: (lambda s: any(x["id"] == cid for x in s["stranded_circuits"]) and s)(health_status(h)),
    )
    log("recovery: A is Lost, its circuit stranded; the Manager re-syncs the endpoint")

    item = dict(items[0])
    item["tags"] = {**item["tags"], "endpoint": {**item["tags"]["endpoint"], "existing_url": url}}
    started = time.monotonic()
    a = h.manager("POST", "/v2/endpoints/bulk", {"endpoints": [item]})
    took = time.monotonic() - started
    expect(a.status == 200, f"the re-sync answers 200: {a}")
    new_url = a.json["endpoints"][0]["url"]
    expect(new_url != url and lo <= port_of(new_url) <= hi, f"a URL on B: {new_url} (was {url})")
    log(f"recovery: re-sync answered 200 in {took:.2f}s with {new_url}")

    token = h.token(dep, user)
    first = proxied(new_url, token)
    wait_for("200 through worker B", lambda: proxied(new_url, token).status == 200)
    log(f"recovery: first request through B answered {first.status}")
    body = proxied(new_url, token).raw
    expect(b"hello from the kernel" in body, f"the kernel's page through B: {body[:200]!r}")
    c = wait_for("the circuit active on B", lambda: (lambda c: c["status"] == "active" and c)(circuit(h, cid)))
    workers = h.manager("GET", "/api/worker").json["workers"]
    b_id = next(w["id"] for w in workers if w["authority"] == B)
    expect(c["worker"] == b_id, f"the circuit is on B ({b_id}): {c}")
    expect(port_of(new_url) == c["port"], f"the circuit's port is the URL's: {c}")
    s = health_status(h)
    expect(all(x["id"] != cid for x in s["stranded_circuits"]), f"no longer stranded: {s}")

    again = h.manager("POST", "/v2/endpoints/bulk", {"endpoints": [item]})
    expect(again.status == 200 and again.json["endpoints"][0]["url"] == new_url, f"idempotent: {again}")

    log("recovery: bulk delete stops it")
    a = h.manager("DELETE", "/v2/endpoints/bulk", {"endpoints": [{"deployment_id": dep}]})
    expect(a.status == 200 and a.json["endpoints"][0]["success"], f"bulk delete: {a}")
    wait_for("the endpoint to stop", lambda: proxied(new_url, token).status != 200)
    log("recovery: all passed")


def main():
    h = Harness(keep="--keep" in sys.argv)
    failed = True
    try:
        scenario(h)
        failed = False
    finally:
        h.close(failed)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""End to end: the coordinator in Backend.AI's Redis service discovery.

Starts this coordinator with APPPROXY_ANNOUNCE_ADDR (and a 1 s refresh) and
reads the registry the way Backend.AI does, with backend-ai-common 26.9.6's
own reader (RedisServiceDiscovery over ValkeyLiveClient, DB 0 of the Redis on
127.0.0.1:6379, from the worker's venv): the group `appproxy-coordinator` holds
one service at the announced address, with upstream's id
(uuid5(NAMESPACE_DNS, "appproxy-coordinator/<addr>")), a healthy, advancing
heartbeat and an expiry of three refreshes; Prometheus can scrape
`prometheus_address` (/metrics answers); a clean shutdown removes the record.
Without APPPROXY_ANNOUNCE_ADDR nothing is registered.

Uses the harness of scripts/e2e_backendai.py (same needs).
"""

import json
import os
import signal
import subprocess
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e_backendai import Harness, expect, free_port, http, log, wait_for  # noqa: E402
from e2e_backendai_sessions import VENV  # noqa: E402

GROUP = "appproxy-coordinator"

# backend-ai-common's reader, as the Manager's service discovery uses it.
READER = r"""
import asyncio, json, sys
from ai.backend.common.service_discovery.redis_discovery.service_discovery import (
    RedisServiceDiscovery, RedisServiceDiscoveryArgs)
from ai.backend.common.types import ValkeyTarget

async def main(group):
    sd = await RedisServiceDiscovery.create(
        RedisServiceDiscoveryArgs(valkey_target=ValkeyTarget(addr="127.0.0.1:6379")))
    try:
        services = await sd.get_service_group(group)
    except ValueError:
        services = []
    out = [{**s.to_dict(), "healthy": s.health_status.check_healthy()} for s in services]
    await sd.close()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"""


def registered():
    r = subprocess.run(
        [os.path.join(VENV, "bin", "python"), "-c", READER, GROUP],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def scenario(h):
    port = free_port()
    addr = f"127.0.0.1:{port}"
    h.port = port
    key_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{GROUP}/{addr}"))
    mine = lambda: [s for s in registered() if s["id"] == key_id]  # noqa: E731

    h.start_coordinator()
    expect(mine() == [], "not registered without APPPROXY_ANNOUNCE_ADDR")
    h.stop("coordinator")

    h.start_coordinator({"APPPROXY_ANNOUNCE_ADDR": addr, "APPPROXY_ANNOUNCE_INTERVAL": "1s"})
    (s,) = wait_for("the coordinator in the registry", mine)
    log(f"discovery: backend.ai common reads {json.dumps(s)}")
    expect(s["service_group"] == GROUP, f"group: {s}")
    expect(s["display_name"].startswith(f"{GROUP}-i-"), f"display name as upstream's: {s}")
    expect(
        s["endpoint"] == {"address": "127.0.0.1", "port": port, "protocol": "http", "prometheus_address": addr},
        f"endpoint: {s['endpoint']}",
    )
    expect(s["healthy"], f"a healthy heartbeat: {s}")
    first = s["health_status"]["last_heartbeat"]
    wait_for("the heartbeat to advance", lambda: mine()[0]["health_status"]["last_heartbeat"] > first)
    ttl = h.redis.cmd("SELECT", 0) and h.redis.cmd("TTL", f"service_discovery.{GROUP}.{key_id}")
    expect(0 < ttl <= 3, f"expires after three refreshes: TTL {ttl}")
    scrape = http("GET", f"http://{s['endpoint']['prometheus_address']}/metrics")
    expect(scrape.status == 200 and b"appproxy_" in scrape.raw, f"Prometheus can scrape it: {scrape.status}")
    log(f"discovery: registered (TTL {ttl} s), heartbeat advancing, /metrics answers at {addr}")

    h.stop("coordinator", signal.SIGTERM)
    expect(mine() == [], "a clean shutdown removes the record")
    log("discovery: removed on shutdown; all passed")


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

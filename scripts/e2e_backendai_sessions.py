#!/usr/bin/env python3
"""End to end: a session's circuits go when the Manager says the session ended.

Starts this coordinator, a stand-in kernel and two unmodified Backend.AI
workers from PyPI (one serving http circuits, one tcp), opens an http app and
a tcp app for each of two sessions through the Manager's interactive flow
(/v2/conf -> /v2/proxy/auth -> the worker's /setup), then announces the end of
the first session on the Manager's core bus with the real producer
(backend-ai-common 26.9.6's EventProducer.anycast_event of a
SessionTerminatedAnycastEvent, into Redis DB 4, stream `events`). Asserts that
the first session's circuits are gone from the coordinator and its URL and TCP
gateway stop serving through the real workers, while the second session's keep
serving; and that the entry was acknowledged by the coordinator's consumer group.
Then the second session ends while the coordinator is stopped in its XREADGROUP
(Redis hands it the entry) and is killed before acknowledging it: the next
coordinator (another consumer of the group) claims the entry once it is idle
for APPPROXY_BACKENDAI_CORE_CLAIM_IDLE (2 s here) and removes those circuits.

Uses the harness of scripts/e2e_backendai.py (same needs).
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_backendai import Harness, http, wait_for, expect, log, proxied  # noqa: E402

STREAM = "events"
KERNEL_PAGE = b"hello from the kernel"
GROUP = "appproxy-coordinator"
VENV = os.environ.get(
    "BACKENDAI_WORKER_VENV",
    os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
        "appproxy-coordinator",
        "backendai-26.9.6",
    ),
)

# The Manager's producer, as backend-ai-common 26.9.6 builds it: a RedisQueue
# on DB 4 whose anycast stream is `events`, source `manager`.
PRODUCER = r"""
import asyncio, sys, uuid
from ai.backend.common.events.dispatcher import EventProducer
from ai.backend.common.events.event_types.session.anycast import SessionTerminatedAnycastEvent
from ai.backend.common.message_queue.redis_queue import RedisMQArgs, RedisQueue
from ai.backend.common.types import AgentId, HostPortPair, RedisTarget, SessionId

async def main(stream, session_id, reason):
    mq = await RedisQueue.create(
        RedisTarget(addr=HostPortPair("127.0.0.1", 6379)),
        RedisMQArgs(anycast_stream_key=stream, broadcast_channel="events_all",
                    consume_stream_keys=None, subscribe_channels=None,
                    group_name="manager", node_id="e2e-manager", db=4))
    producer = EventProducer(mq, source=AgentId("manager"))
    await producer.anycast_event(SessionTerminatedAnycastEvent(
        session_id=SessionId(uuid.UUID(session_id)), reason=reason))
    await producer.close()

asyncio.run(main(*sys.argv[1:4]))
"""


def producer(session, reason="user-requested"):
    """The real producer, started and ready: it writes the entry once told
    (a line on its stdin), so the moment of writing is ours to choose."""
    go = PRODUCER.replace(
        "    await producer.anycast_event(",
        "    print('ready', flush=True)\n    sys.stdin.readline()\n    await producer.anycast_event(",
    )
    p = subprocess.Popen(
        [os.path.join(VENV, "bin", "python"), "-c", go, STREAM, session, reason],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    expect(p.stdout.readline().strip() == "ready", "the producer starts")
    return p


def terminate_session(session, reason="user-requested"):
    """The Manager's session_terminated, written by the real producer."""
    subprocess.run(
        [os.path.join(VENV, "bin", "python"), "-c", PRODUCER, STREAM, session, reason],
        check=True,
        timeout=120,
    )


def open_app(h, session, user, app, protocol):
    """The Manager's interactive flow for one app; answers what the browser
    got from the worker's /setup (the 302 for http, the JSON for tcp)."""
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
    q = urllib.parse.urlencode(
        {"token": a.json["token"], "session_id": session, "app": app, "protocol": protocol, "redirect": ""}
    )
    a = http("GET", f"{h.url}/v2/proxy/auth?{q}", headers={"Accept": "application/json"})
    expect(a.status == 200, f"/v2/proxy/auth {protocol}: {a}")
    return http("GET", a.json["redirect_url"])


def open_http(h, session, user):
    a = open_app(h, session, user, "jupyter", "http")
    expect(a.status == 302, f"/setup answers 302: {a}")
    url = a.headers["Location"]
    cookie = a.headers["Set-Cookie"].split(";", 1)[0]
    wait_for("200 with the cookie", lambda: proxied(url, cookie=cookie).status == 200)
    return {"url": url, "cookie": cookie}


def open_tcp(h, session, user):
    app = "sshd"
    a = open_app(h, session, user, app, "tcp")
    expect(a.status == 200 and a.json and a.json.get("redirect"), f"/setup for tcp: {a}")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(a.json["redirect"]).query)
    gateway = urllib.parse.urlsplit(query["gateway"][0])
    expect(gateway.scheme == "tcp", f"a tcp gateway: {a.json}")
    target = (gateway.hostname, gateway.port)
    log(f"sessions: {app} of {session} at tcp://{target[0]}:{target[1]}")
    wait_for("the kernel through the tcp gateway", lambda: through_tcp(target))
    return target


def through_tcp(target):
    """An HTTP request to the kernel over the raw TCP circuit: whether the
    kernel's page came back (the worker's pipe does not pass the kernel's
    close on, so the answer is read until the page is in)."""
    data = b""
    try:
        with socket.create_connection(target, timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: kernel\r\n\r\n")
            while KERNEL_PAGE not in data and len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        pass
    return KERNEL_PAGE in data


def routes_of(h, session):
    a = http(
        "GET",
        f"{h.url}/routes?session_id={session}",
        headers={"Authorization": f"Bearer {h.manager_token()}"},
    )
    expect(a.status == 200, f"GET /routes: {a}")
    return a.json["items"]


def pending(h):
    """Entries of the coordinators' group not acknowledged yet."""
    h.redis.cmd("SELECT", 4)
    summary = h.redis.cmd("XPENDING", STREAM, GROUP)
    return summary[0] if isinstance(summary, list) else summary


def scenario(h):
    h.authorities = ["e2e-sessions-http", "e2e-sessions-tcp"]
    h.start_kernel()
    h.start_coordinator()
    h.start_worker("worker-1", "e2e-sessions-http")
    # The tcp worker: every option of backendai-worker.sh config may come
    # from the environment.
    os.environ["BACKENDAI_WORKER_PROTOCOL"] = "tcp"
    try:
        h.start_worker("worker-2", "e2e-sessions-tcp")
    finally:
        del os.environ["BACKENDAI_WORKER_PROTOCOL"]

    ended, kept = str(uuid.uuid4()), str(uuid.uuid4())
    apps = {}
    for session in (ended, kept):
        user = str(uuid.uuid4())
        apps[session] = {"http": open_http(h, session, user), "tcp": open_tcp(h, session, user)}
        circuits = routes_of(h, session)
        expect(
            sorted(r["protocol"] for r in circuits) == ["http", "tcp"],
            f"an http and a tcp circuit: {circuits}",
        )
        h.circuits.update(r["id"] for r in circuits)
    log("sessions: two sessions serve an http and a tcp app each")

    wait_for("the coordinator's consumer group on the core bus", lambda: group_exists(h))
    terminate_session(ended)
    h.redis.cmd("SELECT", 4)
    ((entry, fields),) = h.redis.cmd("XREVRANGE", STREAM, "+", "-", "COUNT", 1)
    expect(fields[:2] == ["name", "session_terminated"] and ended in fields[5], f"the entry: {fields}")
    log(f"sessions: the real producer announced the end of the first session ({entry})")
    wait_for("the ended session's circuits gone", lambda: routes_of(h, ended) == [], step=0.02)
    # The entry's id is the Redis server's clock (ms) when it was written.
    took = time.time() - int(entry.split("-")[0]) / 1000
    log(f"sessions: its circuits were gone from the coordinator {took:.2f} s after the entry")
    gone = apps[ended]
    wait_for("the ended session's URL to stop serving", lambda: proxied(gone["http"]["url"], cookie=gone["http"]["cookie"]).status != 200)
    wait_for("the ended session's tcp gateway to stop serving", lambda: not through_tcp(gone["tcp"]))
    live = apps[kept]
    expect(proxied(live["http"]["url"], cookie=live["http"]["cookie"]).status == 200, "the other session's URL serves")
    expect(through_tcp(live["tcp"]), "the other session's tcp gateway serves")
    expect(len(routes_of(h, kept)) == 2, "the other session keeps its circuits")
    wait_for("the entry acknowledged", lambda: pending(h) == 0)
    metrics = http("GET", f"{h.url}/metrics").raw.decode()
    expect("appproxy_backendai_sessions_terminated_total 1" in metrics, "one session handled")
    expect("appproxy_backendai_session_circuits_removed_total 2" in metrics, "two circuits removed")
    killed_before_ack(h, kept, live)
    log("all passed")


def redis_ports_of(pid):
    """The local ports of process pid's connections to Redis (port 6379)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == 6379:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def blocked_reading(h, pid):
    """Whether process pid waits in XREADGROUP (its core bus consumer)."""
    ports = redis_ports_of(pid)
    for line in h.redis.cmd("CLIENT", "LIST").splitlines():
        kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
        port = int(kv.get("addr", ":0").rsplit(":", 1)[1])
        if port in ports and kv.get("cmd") == "xreadgroup" and "b" in kv.get("flags", ""):
            return True
    return False


def killed_before_ack(h, session, apps):
    """A coordinator receives the entry and is killed before XACK: the next
    one claims it after the claim idle time and removes the circuits."""
    log("sessions: a coordinator killed between receiving the entry and acknowledging it")
    go = producer(session)
    coordinator = h.procs["coordinator"]
    # Stopped while it waits in XREADGROUP, it is handed the entry (Redis
    # writes it to the blocked connection) and never acknowledges it.
    for _ in range(50):
        os.kill(coordinator.pid, signal.SIGSTOP)
        if blocked_reading(h, coordinator.pid):
            break
        os.kill(coordinator.pid, signal.SIGCONT)
        time.sleep(0.1)
    else:
        raise AssertionError("the coordinator never waited in XREADGROUP")
    go.stdin.write("go\n")
    go.stdin.close()
    expect(go.wait(timeout=60) == 0, "the producer wrote the entry")
    h.redis.cmd("SELECT", 4)
    ((entry, _),) = h.redis.cmd("XREVRANGE", STREAM, "+", "-", "COUNT", 1)
    held = [p for p in h.redis.cmd("XPENDING", STREAM, GROUP, "-", "+", 10) if p[0] == entry]
    expect(len(held) == 1 and held[0][1].startswith(GROUP + ":"), f"the stopped coordinator holds {entry}: {held}")
    h.stop("coordinator", signal.SIGKILL)
    expect(len(routes_of_db(h, session)) == 2, "nothing removed by the killed coordinator")
    h.start_coordinator({"APPPROXY_BACKENDAI_CORE_CLAIM_IDLE": "2s"})
    wait_for("the session's circuits gone", lambda: routes_of(h, session) == [])
    wait_for("the claimed entry acknowledged", lambda: pending(h) == 0)
    expect("claimed entries another consumer left unacknowledged" in h.log_of("coordinator"), "claimed, not read anew")
    wait_for("its URL to stop serving", lambda: proxied(apps["http"]["url"], cookie=apps["http"]["cookie"]).status != 200)
    wait_for("its tcp gateway to stop serving", lambda: not through_tcp(apps["tcp"]))
    log("sessions: the next coordinator claimed the entry and removed the circuits")


def routes_of_db(h, session):
    """The session's routes, read from the SQLite file (no coordinator runs)."""
    import sqlite3

    with sqlite3.connect(os.path.join(h.tmp, "data", "coordinator.db")) as db:
        return db.execute("SELECT id FROM routes WHERE session_id = ?", (uuid.UUID(session).bytes,)).fetchall()


def group_exists(h):
    h.redis.cmd("SELECT", 4)
    groups = h.redis.cmd("XINFO", "GROUPS", STREAM)
    return isinstance(groups, list) and any(GROUP in g for g in groups if isinstance(g, list))


def main():
    h = Harness()
    h.redis.cmd("SELECT", 4)
    created_stream = h.redis.cmd("EXISTS", STREAM) == 0
    failed = True
    try:
        scenario(h)
        failed = False
    finally:
        h.close(failed)
        if created_stream:
            h.redis.cmd("SELECT", 4)
            h.redis.cmd("DEL", STREAM)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""`make e2e-ui`: the status page (/ui) in a real headless Chromium.

Starts the real coordinator binary ($APPPROXY_COORDINATOR_BIN, else built with
cargo) on the embedded SQLite with a short heartbeat timeout, registers two
workers through the API and keeps them heartbeating, creates routes, then in
Chromium (Debian's chromium + chromium-driver, driven by Python selenium from a
venv that scripts/ui-browser.sh builds):

  1. opens /ui, logs in with the viewer token, sees both workers Ready and
     every route under its worker;
  2. stops one worker's heartbeats: the page shows it Lost, then its routes
     under the other worker, each within DEADLINE_S of the API saying so,
     without a reload (a marker set in the page survives); the recent events
     list the failover;
  3. finds no console errors in the browser's log;
  4. saves ui.png, then at 390 px wide checks there is no horizontal scroll
     and saves ui-phone.png, into $E2E_UI_SCREENSHOTS (`make ui-screenshots`
     sets docs/, the pictures the README shows), else its scratch directory;
  5. logs out: the login form shows, also after a reload.

When chromium cannot be installed here (no apt-get, not root) it says
SKIPPED (not passed) and exits 0.
"""

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
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANAGER = "e2e-ui-manager-token-0123456789"
BOOTSTRAP = "e2e-ui-bootstrap-token-0123456789"
VIEWER = "e2e-ui-viewer-token-0123456789"
HEARTBEAT_TIMEOUT = "2s"
# How long after the API shows a change the page may take to show it.
DEADLINE_S = 3.0
# Generous bound for anything the coordinator itself has to do.
WAIT_S = 60.0


DRIVER = None


def fail(message):
    print(f"e2e-ui: FAILED: {message}", file=sys.stderr)
    if DRIVER is not None:
        try:
            print(f"e2e-ui: the page shows {page_state(DRIVER)}", file=sys.stderr)
            print(f"e2e-ui: the browser logged {DRIVER.get_log('browser')}", file=sys.stderr)
        except Exception as e:  # the browser may be gone
            print(f"e2e-ui: cannot read the page: {e}", file=sys.stderr)
    sys.exit(1)


def expect(condition, message):
    if not condition:
        fail(message)


def ensure_venv():
    """Installs what is missing (scripts/ui-browser.sh), then runs this
    script again with the venv's Python (selenium)."""
    if os.environ.get("E2E_UI_IN_VENV") == "1":
        return
    script = os.path.join(ROOT, "scripts", "ui-browser.sh")
    p = subprocess.run([script, "venv"], stdout=subprocess.PIPE, text=True)
    if p.returncode == 3:
        print("e2e-ui: SKIPPED (not passed): chromium cannot be installed here (see above)")
        sys.exit(0)
    expect(p.returncode == 0, "scripts/ui-browser.sh venv failed")
    python = os.path.join(p.stdout.strip(), "bin", "python")
    os.execve(python, [python, *sys.argv], {**os.environ, "E2E_UI_IN_VENV": "1"})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method, url, token=None, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
            try:
                return r.status, (json.loads(text) if text else None)
            except ValueError:
                return r.status, text
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def wait_for(what, check, timeout=WAIT_S, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    fail(f"timed out after {timeout}s waiting for {what}")


def build():
    given = os.environ.get("APPPROXY_COORDINATOR_BIN")
    if given:
        return os.path.abspath(given)
    subprocess.run(["cargo", "build", "--locked", "--bin", "appproxy-coordinator"], cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "debug", "appproxy-coordinator")


class Heartbeats:
    """Keeps a worker heartbeating (every 0.3 s) until stopped."""

    def __init__(self, url, worker_id, token):
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(url, worker_id, token), daemon=True)
        self.thread.start()

    def run(self, url, worker_id, token):
        while not self.stopped.is_set():
            status, body = call("GET", f"{url}/routes?worker_id={worker_id}&limit=1000", MANAGER)
            acked = max([r["revision"] for r in body["items"]], default=0) if status == 200 else 0
            call("POST", f"{url}/workers/{worker_id}/heartbeat", token, {"acked_revision": acked})
            self.stopped.wait(0.3)

    def stop(self):
        self.stopped.set()
        self.thread.join()


def page_state(driver):
    """What the page shows: {worker name: status}, {route id: worker name}."""
    return driver.execute_script(
        """
        const workers = {}, routes = {};
        for (const w of document.querySelectorAll('#workers article[data-worker]'))
          workers[w.dataset.worker] = w.dataset.status;
        for (const r of document.querySelectorAll('#workers li[data-route]'))
          routes[r.dataset.route] = r.dataset.worker;
        return [workers, routes, window.__e2eMarker === 'no-reload'];
        """
    )


def main():
    ensure_venv()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    binary = build()
    tmp = tempfile.mkdtemp(prefix="e2e-ui-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "APPPROXY_BIND": f"127.0.0.1:{port}",
        "APPPROXY_DATA_DIR": os.path.join(tmp, "data"),
        "APPPROXY_KUBERNETES": "false",
        "APPPROXY_MANAGER_TOKEN": MANAGER,
        "APPPROXY_WORKER_TOKEN": BOOTSTRAP,
        "APPPROXY_VIEWER_TOKEN": VIEWER,
        "APPPROXY_HEARTBEAT_TIMEOUT": HEARTBEAT_TIMEOUT,
        "APPPROXY_FAILOVER_GRACE": "1s",
        "RUST_LOG": os.environ.get("RUST_LOG", "info"),
    }
    log = open(os.path.join(tmp, "coordinator.log"), "wb")
    coordinator = subprocess.Popen([binary], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    driver = None
    beats = []
    try:
        wait_for("the coordinator", lambda: call("GET", f"{url}/readyz")[0] == 200)
        workers = {}
        for name, ports in [("worker-a", [21000, 21099]), ("worker-b", [22000, 22099])]:
            status, body = call(
                "POST",
                f"{url}/workers/register",
                BOOTSTRAP,
                {
                    "name": name,
                    "api_url": f"http://{name}.internal:10201",
                    "capacity": 10,
                    "frontend": {"mode": "port", "host": f"{name}.proxy.example", "port_range": ports},
                },
            )
            expect(status in (200, 201), f"register {name}: {status} {body}")
            workers[name] = (body["worker"]["id"], body["token"])
            beats.append(Heartbeats(url, *workers[name]))
        routes = []
        for service in ["jupyter", "vscode", "tensorboard", "ttyd"]:
            status, body = call(
                "POST",
                f"{url}/routes",
                MANAGER,
                {"session_id": str(uuid.uuid4()), "service": service, "targets": [{"host": "10.0.1.7", "port": 8888}]},
            )
            expect(status == 201, f"create {service}: {status} {body}")
            routes.append(body["id"])
        a_id = workers["worker-a"][0]

        def on(worker_id):
            status, body = call("GET", f"{url}/routes?worker_id={worker_id}&limit=1000", MANAGER)
            return [r["id"] for r in body["items"]] if status == 200 else []

        on_a = on(a_id)
        expect(on_a, "no route landed on worker-a (least-loaded placement should spread them)")

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1150"]:
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
        global DRIVER
        DRIVER = driver

        # 1. Log in; both workers Ready, every route under its worker.
        driver.get(f"{url}/ui")
        token = wait_for("the login form", lambda: driver.find_element(By.ID, "token").is_displayed() and driver.find_element(By.ID, "token"))
        token.send_keys(VIEWER)
        driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
        wait_for(
            "both workers Ready and all routes on the page",
            lambda: (lambda s: s[0] == {"worker-a": "Ready", "worker-b": "Ready"} and set(s[1]) == set(routes))(page_state(driver)),
        )
        expect(driver.execute_script("return document.cookie") == "", "the session cookie is readable by scripts (not HttpOnly)")
        driver.execute_script("window.__e2eMarker = 'no-reload'")
        print(f"e2e-ui: logged in; page shows 2 workers Ready and {len(routes)} routes ({len(on_a)} on worker-a)")

        # 2. worker-a stops heartbeating.
        beats[0].stop()
        stopped = time.monotonic()
        api_lost = page_lost = api_moved = page_moved = None
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and (page_lost is None or page_moved is None):
            # Each time is taken when its observation is made (the API's
            # first: it is the source of the page's truth).
            if api_lost is None:
                status, body = call("GET", f"{url}/workers/{a_id}", MANAGER)
                if status == 200 and body["status"] == "Lost":
                    api_lost = time.monotonic()
            if api_moved is None and api_lost is not None and not on(a_id):
                api_moved = time.monotonic()
            workers_shown, routes_shown, same_page = page_state(driver)
            seen = time.monotonic()
            expect(same_page, "the page reloaded")
            if page_lost is None and workers_shown.get("worker-a") == "Lost":
                page_lost = seen
            if page_moved is None and all(routes_shown.get(r) == "worker-b" for r in routes):
                page_moved = seen
            time.sleep(0.05)
        expect(api_lost is not None, "the API never showed worker-a Lost")
        expect(page_lost is not None, "the page never showed worker-a Lost")
        expect(api_moved is not None and page_moved is not None, "the routes never all moved to worker-b (on the page or in the API)")
        lost_lag = max(0.0, page_lost - api_lost)
        moved_lag = max(0.0, page_moved - api_moved)
        print(
            f"e2e-ui: worker-a Lost in the API {api_lost - stopped:.1f}s after its last heartbeat, "
            f"on the page {lost_lag:.2f}s later; its routes on worker-b in the API after "
            f"{api_moved - stopped:.1f}s, on the page {moved_lag:.2f}s later"
        )
        expect(lost_lag <= DEADLINE_S, f"the page showed Lost {lost_lag:.2f}s after the API (> {DEADLINE_S}s)")
        expect(moved_lag <= DEADLINE_S, f"the page showed the move {moved_lag:.2f}s after the API (> {DEADLINE_S}s)")
        wait_for(
            "the failover among the recent events",
            lambda: driver.execute_script("return document.querySelectorAll('#recent [data-kind=failover]').length") >= len(on_a),
            timeout=DEADLINE_S,
        )
        expect(driver.find_element(By.ID, "live").text == "live", "the page does not say it is live")

        # 3. No console errors.
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        expect(not errors, f"console errors: {errors}")

        # 4. Screenshots; no horizontal scroll at phone width.
        driver.execute_script("window.scrollTo(0, 0)")
        shots = os.environ.get("E2E_UI_SCREENSHOTS") or tmp
        os.makedirs(shots, exist_ok=True)
        desktop = os.path.join(shots, "ui.png")
        driver.save_screenshot(desktop)
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
        )
        time.sleep(0.3)
        widths = driver.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth, window.innerWidth]"
        )
        expect(widths[1] == 390, f"the phone viewport is {widths[1]} px wide, not 390")
        expect(widths[0] <= widths[1], f"horizontal scroll at 390 px: content {widths[0]} px in {widths[1]} px")
        phone = os.path.join(shots, "ui-phone.png")
        driver.save_screenshot(phone)
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        expect(not errors, f"console errors: {errors}")
        print(f"e2e-ui: no console errors; no horizontal scroll at 390 px ({widths[0]} <= {widths[1]}); saved {desktop} and {phone}")

        # 5. Log out: the login form again, and a reload does not bring the page back.
        driver.find_element(By.ID, "logout").click()
        wait_for("the login form after logging out", lambda: driver.find_element(By.ID, "login").is_displayed(), timeout=WAIT_S)
        driver.refresh()
        wait_for("the login form after a reload", lambda: driver.find_element(By.ID, "login").is_displayed(), timeout=WAIT_S)
        expect(not driver.find_element(By.ID, "status").is_displayed(), "the status shows after logging out")
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        expect(not errors, f"console errors after logging out: {errors}")
        print("e2e-ui: logged out: the login form shows, also after a reload")
        print("e2e-ui: passed")
    finally:
        for b in beats:
            b.stopped.set()
        if driver is not None:
            driver.quit()
        try:
            os.killpg(coordinator.pid, signal.SIGTERM)
            coordinator.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(coordinator.pid, signal.SIGKILL)
        if sys.exc_info()[0] is not None or os.environ.get("E2E_UI_KEEP"):
            print(f"e2e-ui: logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

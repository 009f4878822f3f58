// The status page: logs in with a form post (the answer sets an HttpOnly
// session cookie), then follows /ui/events, whose `state` events carry
// everything shown. Text goes in with textContent only, never as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  let source = null;

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function badge(status) {
    return el("span", { class: "badge s-" + status, "data-role": "status" }, status);
  }

  function ago(iso) {
    const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
    if (s < 60) return s + "s ago";
    if (s < 3600) return Math.floor(s / 60) + "m ago";
    return Math.floor(s / 3600) + "h ago";
  }

  function link(url) {
    if (typeof url === "string" && /^https?:\/\//.test(url)) {
      return el("a", { href: url, rel: "noreferrer", target: "_blank" }, url);
    }
    return el("span", {}, url || "(no URL)");
  }

  function routeItem(r, workerName) {
    const what = [r.service, r.app_mode, r.protocol, r.circuit ? "circuit" : null]
      .filter(Boolean).join(" · ");
    return el("li", { "data-route": r.id, "data-worker": workerName || "", "data-status": r.status },
      el("span", { class: "url" }, link(r.url)),
      badge(r.status),
      el("span", { class: "what" }, what),
      r.pending_reason ? el("span", { class: "what" }, r.pending_reason) : null);
  }

  // Through the CSSOM: the policy allows no style attribute in markup.
  function bar(percent) {
    const b = el("span");
    b.style.width = percent + "%";
    return b;
  }

  function empty(text) {
    return el("p", { class: "empty" }, text);
  }

  function render(s) {
    const byWorker = new Map();
    const pending = [];
    for (const r of s.routes) {
      if (r.worker_id) {
        if (!byWorker.has(r.worker_id)) byWorker.set(r.worker_id, []);
        byWorker.get(r.worker_id).push(r);
      } else {
        pending.push(r);
      }
    }
    $("summary").textContent = s.workers.length + " workers · " + s.routes.length +
      (s.routes_truncated ? "+" : "") + " routes · revision " + (s.revision ?? "?");

    const workers = s.workers.map((w) => {
      const routes = byWorker.get(w.id) || [];
      const cap = w.capacity ?? null;
      const load = cap ? Math.min(100, Math.round((100 * w.routes) / cap)) : 0;
      return el("article", { class: "worker s-" + w.status, "data-worker": w.name, "data-status": w.status },
        el("h3", {}, w.name, badge(w.status), w.backendai ? el("span", { class: "what" }, "Backend.AI") : null),
        el("p", { class: "meta" },
          "load " + w.routes + " / " + (cap ?? "∞") + " · heartbeat ",
          el("time", { "data-heartbeat": w.last_heartbeat, dateTime: w.last_heartbeat }, ago(w.last_heartbeat)),
          " · lag " + w.revision_lag + " · " + w.api_url),
        el("div", { class: "load", title: cap ? load + "% of capacity" : "no capacity set" },
          bar(load)),
        routes.length
          ? el("ul", { class: "routes" }, ...routes.map((r) => routeItem(r, w.name)))
          : empty("no routes"));
    });
    $("workers").replaceChildren(...(workers.length ? workers : [empty("no workers registered")]));

    $("pending").replaceChildren(pending.length
      ? el("ul", { class: "routes" }, ...pending.map((r) => routeItem(r, null)))
      : empty("none"));

    $("stranded").replaceChildren(s.stranded.length
      ? el("ul", { class: "routes" }, ...s.stranded.map((x) =>
        el("li", { "data-stranded": x.route_id },
          el("span", { class: "url" }, link(x.url)),
          el("span", { class: "what" }, "on " + x.worker + ": " + x.reason))))
      : empty("none"));

    $("recent").replaceChildren(...(s.recent.length
      ? s.recent.map((a) => el("li", { class: "k-" + a.kind, "data-kind": a.kind },
        el("time", { dateTime: a.at }, new Date(a.at).toLocaleTimeString()), a.text))
      : [el("li", { class: "empty" }, "nothing since this replica started")]));
  }

  // Heartbeat ages move on between updates without asking the server.
  setInterval(() => {
    for (const t of document.querySelectorAll("time[data-heartbeat]")) {
      t.textContent = ago(t.getAttribute("data-heartbeat"));
    }
  }, 1000);

  function live(on) {
    const b = $("live");
    b.textContent = on ? "live" : "offline";
    b.className = "badge " + (on ? "on" : "off");
  }

  function stop() {
    if (source) source.close();
    source = null;
    live(false);
  }

  function showLogin(message) {
    stop();
    $("status").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  function start() {
    $("login").hidden = true;
    $("status").hidden = false;
    $("logout").hidden = false;
    stop();
    source = new EventSource("/ui/events");
    source.addEventListener("open", () => live(true));
    source.addEventListener("state", (e) => {
      live(true);
      render(JSON.parse(e.data));
    });
    source.addEventListener("error", () => {
      live(false);
      // Closed for good (e.g. the session expired): ask again.
      if (source && source.readyState === EventSource.CLOSED) setTimeout(check, 1000);
    });
  }

  async function check() {
    try {
      const r = await fetch("/ui/session", { credentials: "same-origin", cache: "no-store" });
      const body = await r.json();
      if (body.session) start();
      else showLogin();
    } catch (e) {
      showLogin("cannot reach the coordinator");
    }
  }

  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = new URLSearchParams({ token: $("token").value });
    $("token").value = "";
    try {
      const r = await fetch("/ui/login", { method: "POST", body, credentials: "same-origin" });
      if (r.status === 204) return start();
      let detail = "login failed (" + r.status + ")";
      try { detail = (await r.json()).detail || detail; } catch (_) { /* not JSON */ }
      showLogin(detail);
    } catch (_) {
      showLogin("cannot reach the coordinator");
    }
  });

  $("logout").addEventListener("click", async () => {
    await fetch("/ui/logout", { method: "POST", credentials: "same-origin" });
    showLogin();
  });

  check();
})();

"""Schemathesis hooks for scripts/fuzz.sh.

The document states three rules that JSON Schema has no keyword for (see
crates/core/src/domain/schemas.rs): a health check's `timeout_s` is at most its
`interval_s` (defaults: 10 and 5), a port range's low end is at most its high
end, and `expires_at` is in the future; and target ids are unique within a
route (a request body, or each `spec` of a list of creates). Data generated
as *valid* is made to keep them; data generated as
invalid is left alone, so the server must still refuse it.
"""

from datetime import datetime, timedelta, timezone

import schemathesis
from schemathesis.generation import GenerationMode


def _positive(case):
    meta = case.meta
    return meta is not None and meta.generation.mode == GenerationMode.POSITIVE


def _health_check(check):
    if not isinstance(check, dict):
        return
    interval = check.get("interval_s", 10)
    timeout = check.get("timeout_s", 5)
    if isinstance(interval, (int, float)) and isinstance(timeout, (int, float)) and timeout > interval:
        check["timeout_s"] = interval


def _targets(targets):
    if not isinstance(targets, list):
        return
    seen = set()
    for target in targets:
        if isinstance(target, dict) and target.get("id") is not None:
            if target["id"] in seen:
                del target["id"]
            else:
                seen.add(target["id"])


def _keep_rules(body):
    """Makes one route spec (or registration) keep the rules above."""
    if body.get("expires_at") is not None:
        body["expires_at"] = (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()
    _health_check(body.get("health_check"))
    _targets(body.get("targets"))
    frontend = body.get("frontend")
    if isinstance(frontend, dict):
        port_range = frontend.get("port_range")
        if isinstance(port_range, list) and len(port_range) == 2 and port_range[0] > port_range[1]:
            frontend["port_range"] = [port_range[1], port_range[0]]


@schemathesis.hook
def map_case(context, case):
    body = case.body
    if not _positive(case):
        return case
    if isinstance(body, dict):
        _keep_rules(body)
    elif isinstance(body, list):
        # Another replica's creates (`POST /internal/creates`): each item's spec.
        for item in body:
            if isinstance(item, dict) and isinstance(item.get("spec"), dict):
                _keep_rules(item["spec"])
    return case

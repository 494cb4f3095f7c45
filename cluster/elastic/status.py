"""The elastic controller's part of `pdserve status`: its counters and last decisions."""

from __future__ import annotations

import time

SHOWN_DECISIONS = 8


def render_controller(stats: dict) -> list[str]:
    if "error" in stats:
        return [f"elastic controller: {stats['error']}"]
    counters = stats.get("counters", {})
    p50 = stats.get("switch_seconds_p50")
    state = "on" if stats.get("enabled") else "off (watching)"
    done = counters.get("switch_done", 0)
    failed = counters.get("switch_failed", 0)
    switch = f"switches done {done}, failed {failed}"
    if p50 is not None:
        switch += f" (p50 {p50:.1f} s)"
    added, removed = counters.get("add_done", 0), counters.get("remove_done", 0)
    if added or removed or counters.get("add_failed") or counters.get("remove_failed"):
        switch += f"; instances added {added}, removed {removed}"
    lines = [f"elastic controller: {state}, {switch}"]
    for record in stats.get("decisions", [])[-SHOWN_DECISIONS:]:
        when = time.strftime("%H:%M:%S", time.localtime(record["at"]))
        target = record["instance"] or "new instance"
        source = f"{record['from_role']} -> " if record.get("from_role") else ""
        outcome = record["outcome"]
        if record.get("seconds") is not None and outcome == "done":
            outcome = f"done in {record['seconds']:.1f} s"
        lines.append(
            f"  {when} {record['kind']} {target} {source}{record['to_role']}: {outcome} "
            f"-- {record['reason']}"
        )
    return lines

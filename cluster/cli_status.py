"""`pdserve status`: the running deployment's instances with role, address, load and KV usage."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cluster.elastic.status import render_controller

_ROLE_ORDER = {"prefill": 0, "decode": 1, "mixed": 2}


def collect(namespace: str, timeout_s: float) -> tuple[dict | None, list[dict]]:
    """(router stats, instance stats) from the named actors of `namespace`."""
    import ray

    names = sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == namespace
    )
    router = None
    instances = []
    refs = {name: ray.get_actor(name, namespace=namespace).stats.remote() for name in names}
    for name, ref in refs.items():
        try:
            stats = ray.get(ref, timeout=timeout_s)
        except Exception as exc:  # a dead or hung actor is reported, not fatal
            stats = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        if name == "router":
            router = stats
        else:
            instances.append(stats)
    instances.sort(key=lambda s: (_ROLE_ORDER.get(s.get("role", ""), 3), s.get("name", "")))
    return router, instances


def render(router: dict | None, instances: list[dict]) -> str:
    lines = []
    if router is not None:
        lines.append(
            f"router  {router.get('url', '?')}  in flight {router.get('inflight_requests', 0)}"
        )
    header = f"{'instance':<12} {'role':<8} {'address':<24} {'run':>4} {'wait':>5} {'KV used':>14}"
    lines += [header, "-" * len(header)]
    for s in instances:
        if s.get("role") != "controller":
            lines.append(_row(s))
    for s in instances:
        if s.get("role") == "controller":
            lines += render_controller(s)
    return "\n".join(lines)


def _row(s: dict[str, Any]) -> str:
    if "error" in s:
        return f"{s['name']:<12} {'?':<8} {s['error']}"
    role = s.get("role", "messager")
    address = s.get("inbox", "").removeprefix("tcp://")
    waiting = s.get("waiting", s.get("waiting_for_kv", s.get("deferred", 0)))
    running = s.get("running", s.get("tasks", 0))
    kv = ""
    if "num_blocks" in s:
        used = s["num_blocks"] - s["free_blocks"]
        kv = f"{used}/{s['num_blocks']} ({100 * used / s['num_blocks']:.0f}%)"
    return f"{s['name']:<12} {role:<8} {address:<24} {running:>4} {waiting:>5} {kv:>14}"


def status(args: argparse.Namespace) -> int:
    import ray

    try:
        ray.init(
            address=args.address,
            namespace=args.namespace,
            logging_level="ERROR",
            log_to_driver=False,
        )
    except ConnectionError as exc:
        print(f"pdserve: error: no Ray cluster at {args.address}: {exc}", file=sys.stderr)
        return 2
    router, instances = collect(args.namespace, args.timeout)
    if router is None and not instances:
        print(f"pdserve: no deployment in Ray namespace {args.namespace!r}", file=sys.stderr)
        return 1
    print(render(router, instances))
    return 0


def add_status(subparsers) -> None:
    p = subparsers.add_parser("status", help="show a running deployment's instances")
    p.add_argument(
        "--address", default="auto", help="Ray cluster address ('auto': the local cluster)"
    )
    p.add_argument(
        "--namespace", default="pdserve", help="Ray namespace of the deployment (cluster.namespace)"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait per actor")
    p.set_defaults(func=status)

"""`pdserve status`: the running deployment's instances with role, address, load and KV usage."""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from typing import Any

from cluster import console
from cluster.elastic.status import render_controller
from cluster.preflight import check_ray_reachable
from engine.errors import DeployError

_ROLE_ORDER = {"prefill": 0, "decode": 1, "mixed": 2}


def collect(namespace: str, timeout_s: float) -> tuple[dict | None, list[dict]]:
    """(router stats, instance stats) from the named actors of `namespace`."""
    import ray

    from cluster.tp_ranks import is_rank_actor

    names = sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == namespace and not is_rank_actor(a["name"])
    )
    router = None
    instances = []
    refs = {name: ray.get_actor(name, namespace=namespace).stats.remote() for name in names}
    # One deadline for all of them: hung actors cost timeout_s in all, not each.
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    for name, ref in refs.items():
        try:
            stats = ray.get(ref, timeout=0)
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
    # Names as long as the longest (`messager-decode-1`: an elastic decode instance's messager).
    rows = [s for s in instances if s.get("role") != "controller"]
    width = max([12, *(len(s.get("name", "")) for s in rows)])
    header = (
        f"{'instance':<{width}} {'role':<8} {'address':<24} {'run':>4} {'wait':>5} {'KV used':>14}"
    )
    lines += [header, "-" * len(header)]
    lines += [_row(s, width) for s in rows]
    for s in instances:
        if s.get("role") == "controller":
            lines += render_controller(s)
    return "\n".join(lines)


def _row(s: dict[str, Any], width: int = 12) -> str:
    if "error" in s:
        return f"{s['name']:<{width}} {'?':<8} {s['error']}"
    role = s.get("role", "messager")
    address = s.get("inbox", "").removeprefix("tcp://")
    waiting = s.get("waiting", s.get("waiting_for_kv", s.get("deferred", 0)))
    running = s.get("running", s.get("tasks", 0))
    kv = ""
    if "num_blocks" in s:
        used = s["num_blocks"] - s["free_blocks"]
        kv = f"{used}/{s['num_blocks']} ({100 * used / s['num_blocks']:.0f}%)"
    return f"{s['name']:<{width}} {role:<8} {address:<24} {running:>4} {waiting:>5} {kv:>14}"


def join(address: str, namespace: str, timeout_s: float) -> None:
    """ray.init(address) within timeout_s, or a one-line DeployError. Ray itself retries an
    address for minutes, so its GCS must first accept a connection, and ray.init runs on a
    daemon thread the CLI stops waiting for (the process then exits)."""
    import ray

    check_ray_reachable(address, timeout_s)
    outcome: queue.Queue[BaseException | None] = queue.Queue()

    def init() -> None:
        try:
            ray.init(
                address=address, namespace=namespace, logging_level="ERROR", log_to_driver=False
            )
            outcome.put(None)
        except BaseException as exc:  # handed to the waiting thread
            outcome.put(exc)

    threading.Thread(target=init, name="ray-join", daemon=True).start()
    try:
        error = outcome.get(timeout=timeout_s)
    except queue.Empty:
        raise DeployError(
            f"no Ray cluster answered at {address} within --timeout {timeout_s:g} s"
        ) from None
    if error is not None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DeployError(f"could not join the Ray cluster at {address}: {first}") from error


def status(args: argparse.Namespace) -> int:
    console.native_stderr_to(console.STATUS_LOG_FILE)
    join(args.address, args.namespace, args.timeout)
    router, instances = collect(args.namespace, args.timeout)
    if router is None and not instances:
        print(f"pdserve: no deployment in Ray namespace {args.namespace!r}", file=sys.stderr)
        return 1
    print(render(router, instances))
    return 0


def add_deployment_args(p: argparse.ArgumentParser, timeout_help: str) -> None:
    """--address, --namespace and --timeout of the commands that talk to a running deployment."""
    p.add_argument(
        "--address", default="auto", help="Ray cluster address ('auto': the local cluster)"
    )
    p.add_argument(
        "--namespace", default="pdserve", help="Ray namespace of the deployment (cluster.namespace)"
    )
    p.add_argument("--timeout", type=float, default=10.0, help=timeout_help)


def add_status(subparsers) -> None:
    p = subparsers.add_parser("status", help="show a running deployment's instances")
    add_deployment_args(
        p, "seconds to wait for the Ray cluster to answer, then for the actors' stats"
    )
    p.set_defaults(func=status)

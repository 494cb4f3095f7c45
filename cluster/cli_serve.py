"""`pdserve serve CONFIG`: start a deployment and keep it up until Ctrl-C or SIGTERM, then
drain it and stop (cluster/shutdown.py)."""

from __future__ import annotations

import argparse
import sys
import time

_STOP_S = 30.0  # instances' own shutdown, after the drain
_STOP_AT_ONCE_S = 5.0  # the same after a second signal
_RAY_EXIT_S = 10.0  # Ray's processes get this long to exit after ray.shutdown()


def serve(args: argparse.Namespace) -> int:
    import ray

    from cluster import console, preflight
    from cluster.config import load_config
    from cluster.launcher import deploy, init_ray
    from cluster.shutdown import ChildProcesses, ShutdownSignals

    config = load_config(args.config)
    preflight.apply_port(config, args.port)
    preflight.check_serve(config, args.address)  # before Ray starts: one line if it fails
    if args.address:
        config.cluster.address = args.address
    config.cluster.log_to_driver |= args.verbose
    started = time.monotonic()
    print(f"pdserve: starting {_describe(config)} ...", file=sys.stderr, flush=True)
    if not config.cluster.log_to_driver:
        driver_log = console.route_ray_logs()
        print(f"pdserve: {console.where_logs_are(driver_log)}", file=sys.stderr, flush=True)
    owns_ray = init_ray(config, args.address)
    signals = ShutdownSignals()
    signals.install()  # after ray.init, so ours replace Ray's (see cluster/shutdown.py)
    children = ChildProcesses()
    children.snapshot()
    deployment = None
    at_once = False
    try:
        deployment = deploy(config, address=args.address)
        signals.serving()
        children.snapshot()
        took = time.monotonic() - started  # Ray, weights, KV caches, graphs, warm-up
        ready = f"ready in {took:.1f} s (Ctrl-C to stop)"
        print(f"pdserve: serving {deployment.url}/v1, {ready}", flush=True)
        at_once = not _drain_on_signal(deployment, config.router.drain_timeout_s, signals)
    finally:
        print("pdserve: shutting down ...", file=sys.stderr, flush=True)
        if deployment is not None:
            deployment.stop(timeout_s=_STOP_AT_ONCE_S if at_once else _STOP_S)
        if owns_ray:
            children.snapshot()
            ray.shutdown()
            killed = children.reap(_RAY_EXIT_S)
            if killed:
                print(
                    f"pdserve: killed Ray processes left running: {', '.join(killed)}",
                    file=sys.stderr,
                    flush=True,
                )
    print("pdserve: stopped", file=sys.stderr, flush=True)
    return 0


def _drain_on_signal(deployment, drain_timeout_s: float, signals) -> bool:
    """Serve until a signal, then drain; False when a second signal cut the drain short."""
    import ray

    from cluster.shutdown import drain

    first = signals.next_event()
    print(
        f"pdserve: {first.detail}: draining: no new requests, up to {drain_timeout_s:g} s for "
        f"those in flight ({first.detail} again stops at once)",
        file=sys.stderr,
        flush=True,
    )
    outcome = drain(deployment.router, drain_timeout_s, signals)
    if outcome.complete:
        reason = "the server is shutting down"
        print("pdserve: drained: every request finished", file=sys.stderr, flush=True)
    elif outcome.interrupted_by:
        reason = f"the server is shutting down ({outcome.interrupted_by} received twice)"
        print(f"pdserve: {outcome.interrupted_by}: stopping at once", file=sys.stderr, flush=True)
    elif outcome.error:
        reason = "the server is shutting down"
        print(f"pdserve: drain failed: {outcome.error}", file=sys.stderr, flush=True)
    else:
        reason = f"the server is shutting down (router.drain_timeout_s: {drain_timeout_s:g} s)"
        left = "some" if outcome.inflight < 0 else str(outcome.inflight)
        print(
            f"pdserve: drain timeout: ending {left} requests in flight", file=sys.stderr, flush=True
        )
    try:  # in-flight streams end with an error event naming the reason, not a cut connection
        ray.get(deployment.router.stop.remote(reason), timeout=_STOP_AT_ONCE_S * 4)
    except Exception as exc:  # deployment.stop() kills it anyway
        print(f"pdserve: the router did not stop cleanly: {exc}", file=sys.stderr, flush=True)
    return outcome.interrupted_by is None


def _describe(config) -> str:
    parts = []
    if config.prefill.instances:
        parts.append(f"{config.prefill.instances}P{config.decode.instances}D")
    if config.mixed.instances:
        parts.append(f"{config.mixed.instances} mixed")
    model = config.model.path or "SmolLM2-135M-Instruct (default)"
    return f"{' + '.join(parts)} serving {model} over {config.transfer.backend.value}"


def add_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="start a cluster from a topology YAML")
    p.add_argument("config", help="topology YAML, e.g. configs/tiny-1p1d.yaml")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join ('auto' or host:port); default: "
        "the config's cluster.address, else an embedded local Ray",
    )
    p.add_argument(
        "--port", type=int, default=None, help="router.port (0: any free; default: the config's)"
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print Ray's, NIXL's and the actors' log lines here (cluster.log_to_driver); "
        "otherwise they go to log files",
    )
    p.set_defaults(func=serve)

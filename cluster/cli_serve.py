"""`pdserve serve CONFIG`: start a deployment and keep it up until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def serve(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.launcher import deploy

    config = load_config(args.config)
    if args.port is not None:
        config.router.port = args.port
    print(f"pdserve: starting {_describe(config)} ...", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deployment = deploy(config, address=args.address)
    try:
        print(f"pdserve: serving {deployment.url}/v1 (Ctrl-C to stop)", flush=True)
        stop.wait()
    finally:
        print("pdserve: shutting down ...", file=sys.stderr, flush=True)
        deployment.stop()
    return 0


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
    p.add_argument("--port", type=int, default=None, help="override router.port")
    p.set_defaults(func=serve)

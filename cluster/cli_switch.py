"""`pdserve switch NAME ROLE`: switch a running elastic deployment's instance to another role now;
`pdserve scale add ROLE` / `pdserve scale remove NAME`: add an instance, or remove one that was
added (the elastic controller carries them out as it does its own decisions, cluster/elastic/)."""

from __future__ import annotations

import argparse

from cluster import console
from cluster.cli_status import add_deployment_args, join
from cluster.elastic.ray_actuator import CONTROLLER_NAME
from engine.config import Role
from engine.errors import DeployError

SCALABLE_ROLES = (Role.PREFILL.value, Role.DECODE.value)


def _controller(args: argparse.Namespace):
    import ray

    console.native_stderr_to(console.STATUS_LOG_FILE)
    join(args.address, args.namespace, args.timeout)
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=args.namespace)
    except ValueError:
        raise DeployError(
            f"no elastic controller in Ray namespace {args.namespace!r} "
            "(the deployment needs elastic.enabled: true)"
        ) from None


def switch(args: argparse.Namespace) -> int:
    import ray

    controller = _controller(args)
    call = controller.force_switch.remote(args.name, args.role, args.wait)
    record = ray.get(call, timeout=args.wait + args.timeout)
    return _report(f"{args.name} -> {args.role}", record)


def _report(what: str, record: dict) -> int:
    """One line for a forced change's decision record; exit status 0 only when it was done."""
    outcome = record["outcome"]
    seconds = f" in {record['seconds']:.2f} s" if record.get("seconds") is not None else ""
    print(f"{what}: {outcome}{seconds}")
    return 0 if outcome == "done" else 1


def add_switch(subparsers) -> None:
    p = subparsers.add_parser(
        "switch", help="switch an instance of a running elastic deployment to another role"
    )
    p.add_argument("name", help="the instance, as `pdserve status` lists it (e.g. decode-1)")
    p.add_argument("role", choices=[r.value for r in Role], help="the role it serves next")
    add_deployment_args(p, "seconds to wait for the Ray cluster to answer")
    p.add_argument(
        "--wait",
        type=float,
        default=120.0,
        help="seconds to wait for the switch (drain included) before reporting it pending",
    )
    p.set_defaults(func=switch)


def scale(args: argparse.Namespace) -> int:
    import ray

    if args.action == "add" and args.target not in SCALABLE_ROLES:
        raise DeployError(
            f"instances are added as {' or '.join(SCALABLE_ROLES)}, not {args.target}"
        )
    controller = _controller(args)
    if args.action == "add":
        call = controller.force_add.remote(args.target, args.wait)
    else:
        call = controller.force_remove.remote(args.target, args.wait)
    record = ray.get(call, timeout=args.wait + args.timeout)
    return _report(f"{args.action} {record.get('instance') or args.target}", record)


def add_scale(subparsers) -> None:
    p = subparsers.add_parser(
        "scale", help="add an instance to a running elastic deployment, or remove an added one"
    )
    p.add_argument("action", choices=["add", "remove"], help="add or remove an instance")
    p.add_argument(
        "target", help="add: the role (prefill or decode); remove: the name (e.g. decode-2)"
    )
    add_deployment_args(p, "seconds to wait for the Ray cluster to answer")
    p.add_argument(
        "--wait",
        type=float,
        default=600.0,
        help="seconds to wait for the instance to start (or drain) before reporting it pending",
    )
    p.set_defaults(func=scale)

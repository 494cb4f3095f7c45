"""`pdserve switch NAME ROLE`: switch a running elastic deployment's instance to another role now
(the elastic controller carries it out as it does its own decisions, cluster/elastic/)."""

from __future__ import annotations

import argparse

from cluster import console
from cluster.cli_status import add_deployment_args, join
from cluster.elastic.ray_actuator import CONTROLLER_NAME
from engine.config import Role
from engine.errors import DeployError


def switch(args: argparse.Namespace) -> int:
    import ray

    console.native_stderr_to(console.STATUS_LOG_FILE)
    join(args.address, args.namespace, args.timeout)
    try:
        controller = ray.get_actor(CONTROLLER_NAME, namespace=args.namespace)
    except ValueError:
        raise DeployError(
            f"no elastic controller in Ray namespace {args.namespace!r} "
            "(the deployment needs elastic.enabled: true)"
        ) from None
    call = controller.force_switch.remote(args.name, args.role, args.wait)
    record = ray.get(call, timeout=args.wait + args.timeout)
    outcome = record["outcome"]
    seconds = f" in {record['seconds']:.2f} s" if record.get("seconds") is not None else ""
    print(f"{args.name} -> {args.role}: {outcome}{seconds}")
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

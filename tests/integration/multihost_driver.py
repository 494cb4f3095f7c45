"""Driver of the multi-host test (test_multihost.py); runs inside network namespace A.

It joins the two-node Ray cluster the test started, checks that the launcher's placement
(custom resources and label selectors) lands on the right node, deploys 1P1D with prefill
pinned to `prefill_node` and decode to `decode_node`, sends greedy requests over HTTP and
writes everything the test asserts on to a JSON file: texts, stats, where each actor runs,
and how many bytes crossed the veth link. The test itself runs outside the namespaces, where
the cluster's addresses are unreachable, so all cluster access happens here.

    python tests/integration/multihost_driver.py --address 10.231.0.1:6390 \
        --prompts prompts.json --max-tokens 24 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script: make the repo root importable (tests.*, cluster.*) without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import PdserveConfig
from cluster.launcher import Deployment, deploy, init_ray
from cluster.spawn import actor_options, instance_placement_group
from tests.integration.harness import assert_all_free, run_load, small_config

LABEL_KEY = "pdserve-role"


def cluster_config(address: str) -> PdserveConfig:
    """1P1D over NIXL; P needs `prefill_node`, D needs `decode_node` (one node each)."""
    return small_config(
        cluster={"address": address, "startup_timeout_s": 120},
        # Bound on every interface of whichever node the router lands on; the URL it
        # reports carries that node's address.
        router={"host": "0.0.0.0"},
        prefill={"placement": {"num_cpus": 0.5, "resources": {"prefill_node": 1}}},
        decode={"placement": {"num_cpus": 0.5, "resources": {"decode_node": 1}}},
        transfer={"backend": "nixl"},
    )


class _Probe:
    """A placeholder actor: where the launcher's options put it is all we look at."""

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()


def probe_label_selectors(config: PdserveConfig) -> dict[str, dict[str, str]]:
    """Place a probe with each role label through the launcher's own option builders, once as
    a plain actor (decode/mixed path) and once in a prefill placement group bundle."""
    seen: dict[str, dict[str, str]] = {}
    for role in ("prefill", "decode"):
        placement = config.decode.placement.model_copy(
            update={"num_cpus": 0.1, "resources": {}, "label_selector": {LABEL_KEY: role}}
        )
        actor = ray.remote(_Probe).options(**actor_options(placement, f"probe-{role}", config))
        pg = instance_placement_group(placement, config.prefill.engine, 0.25)
        ray.get(pg.ready(), timeout=60)
        strategy = PlacementGroupSchedulingStrategy(pg, 0)
        in_pg = ray.remote(_Probe).options(num_cpus=0.1, scheduling_strategy=strategy)
        handles = [actor.remote(), in_pg.remote()]
        actor_ip, bundle_ip = ray.get([h.node_ip.remote() for h in handles], timeout=60)
        seen[role] = {"actor": actor_ip, "bundle": bundle_ip}
        for handle in handles:
            ray.kill(handle)
        ray.util.remove_placement_group(pg)
    return seen


def _where(actor: Any) -> dict[str, Any]:
    """Ray's node address of an actor and the network namespace its process lives in."""

    def look(instance: Any) -> dict[str, Any]:
        return {
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "netns": os.readlink("/proc/self/ns/net"),
        }

    return ray.get(actor.__ray_call__.remote(look), timeout=30)


def placement_report(dep: Deployment) -> dict[str, Any]:
    actors = {
        "prefill-0": dep.prefills[0],
        "messager-0": dep.messagers[0],
        "decode-0": dep.decodes[0],
        "router": dep.router,
    }
    report = {name: _where(actor) for name, actor in actors.items()}
    inboxes = {str(e["name"]): e["inbox"] for e in dep.endpoints}
    for name, inbox in inboxes.items():
        report[name]["inbox"] = inbox
    report["router"]["url"] = dep.url
    return report


def veth_tx_bytes() -> dict[str, int]:
    """Bytes sent by this namespace's interfaces (this namespace's /sys, as ip netns exec
    mounts it)."""
    out = {}
    for dev in Path("/sys/class/net").iterdir():
        out[dev.name] = int((dev / "statistics" / "tx_bytes").read_text())
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = cluster_config(args.address)
    prompts = json.loads(Path(args.prompts).read_text())
    result: dict[str, Any] = {"driver_netns": os.readlink("/proc/self/ns/net")}
    t0 = time.monotonic()
    init_ray(config)
    result["nodes"] = [
        {"ip": n["NodeManagerAddress"], "resources": n["Resources"], "labels": n.get("Labels")}
        for n in ray.nodes()
        if n["Alive"]
    ]
    result["label_probes"] = probe_label_selectors(config)
    dep = deploy(config)
    result["deploy_s"] = time.monotonic() - t0
    try:
        result["placement"] = placement_report(dep)
        before = veth_tx_bytes()
        t1 = time.monotonic()
        result["texts"] = run_load(dep.url, prompts, args.max_tokens)
        result["load_s"] = time.monotonic() - t1
        after = veth_tx_bytes()
        result["tx_bytes"] = {dev: after[dev] - before.get(dev, 0) for dev in after}
        result["stats"] = assert_all_free(dep)
    finally:
        dep.stop()
        ray.shutdown()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="Ray head, HOST:PORT")
    parser.add_argument("--prompts", required=True, help="JSON file: a list of prompts")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args()
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

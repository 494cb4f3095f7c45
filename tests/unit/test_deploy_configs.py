"""The `ray up` cluster files in deploy/ against Ray's own cluster-config schema, and the
topology they serve (configs/cluster-pd.yaml) against pdserve's config model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml

from cluster.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILES = ["deploy/aws-pd.yaml", "deploy/onprem-pd.yaml"]
ROLE_RESOURCES = {"prefill_node", "decode_node"}


def _load(path: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / path).read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", CLUSTER_FILES)
def test_cluster_file_matches_rays_schema(path: str, ray_schema: dict[str, Any]) -> None:
    jsonschema.validate(_load(path), ray_schema)


def test_schema_check_catches_a_misspelt_key(ray_schema: dict[str, Any]) -> None:
    config = _load("deploy/aws-pd.yaml")
    config["worker_start_ray_command"] = config.pop("worker_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="worker_start_ray_command"):
        jsonschema.validate(config, ray_schema)


@pytest.mark.parametrize("path", CLUSTER_FILES)
def test_ray_up_accepts_the_cluster_file(path: str) -> None:
    """What `ray up` does before it touches any machine: fill in the provider's defaults and
    validate (for the local provider this also builds its single node type)."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = util.prepare_config(_load(path))
    util.validate_config(config)


def test_aws_node_types_mark_prefill_and_decode() -> None:
    config = _load("deploy/aws-pd.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not ROLE_RESOURCES & set(head["resources"]), "instances must not land on the head"
    advertised = {
        name: set(t["resources"]) & ROLE_RESOURCES
        for name, t in types.items()
        if name != config["head_node_type"]
    }
    assert sorted(advertised.values(), key=sorted) == [{"decode_node"}, {"prefill_node"}]
    for t in types.values():
        assert t["node_config"]["InstanceType"]


def test_onprem_workers_advertise_a_role_resource() -> None:
    config = _load("deploy/onprem-pd.yaml")
    assert config["provider"]["head_ip"] not in config["provider"]["worker_ips"]
    start = " ".join(config["worker_start_ray_commands"])
    assert "--resources" in start and "_node" in start and "PREFILL_HOSTS" in start
    prefill_hosts = start.split('PREFILL_HOSTS="', 1)[1].split('"', 1)[0].split()
    assert prefill_hosts and set(prefill_hosts) < set(config["provider"]["worker_ips"])


def test_setup_installs_pdserve_and_start_commands_start_ray() -> None:
    for path in CLUSTER_FILES:
        config = _load(path)
        setup = "\n".join(config["setup_commands"])
        assert "~/pdserve" in setup and "ray[default]==" in setup, path
        assert config["file_mounts"]["~/pdserve"] == "."
        assert any("ray start --head" in c for c in config["head_start_ray_commands"]), path
        assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"]), path


def test_pinned_ray_matches_the_installed_one() -> None:
    """`ray up` refuses a cluster whose Ray differs from the launching machine's."""
    for path in CLUSTER_FILES:
        setup = "\n".join(_load(path)["setup_commands"])
        assert f"ray[default]=={ray.__version__}" in setup, path


def test_topology_pins_prefill_and_decode_to_their_nodes() -> None:
    config = load_config(REPO / "configs/cluster-pd.yaml")
    assert config.prefill.placement.resources == {"prefill_node": 1}
    assert config.decode.placement.resources == {"decode_node": 1}
    assert config.cluster.address == "auto"
    assert config.router.host == "0.0.0.0"  # reachable from other nodes
    assert config.prefill.instances >= 1 and config.decode.instances >= 1

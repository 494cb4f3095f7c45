"""Adding and removing instances: the pure parts (resources asked for, room, minimums)."""

from __future__ import annotations

from cluster.config import parse_config
from cluster.elastic.scaling import fits, minimum_kept, resource_bundles
from engine.config import Role

P, D = Role.PREFILL, Role.DECODE


def config(**elastic):
    return parse_config(
        {
            "prefill": {
                "placement": {"num_cpus": 1, "num_gpus": 1},
                "engine": {"tensor_parallel_size": 2},
            },
            "decode": {
                "instances": 2,
                "placement": {"num_cpus": 2, "num_gpus": 1},
                "engine": {"tensor_parallel_size": 2},
            },
            "elastic": {"enabled": True, "min_decode_instances": 2, **elastic},
        }
    )


def test_the_request_holds_every_instance_with_its_messager_and_ranks() -> None:
    bundles = resource_bundles(config(), [P, D])
    assert bundles == [
        {"CPU": 1.25, "GPU": 1},  # prefill rank 0 and its messager
        {"CPU": 1, "GPU": 1},  # prefill rank 1
        {"CPU": 2.25, "GPU": 1},  # decode rank 0 and its spare messager (elastic)
        {"CPU": 2, "GPU": 1},  # decode rank 1
    ]
    assert resource_bundles(config(), []) == []


def test_room_is_what_is_free_summed_over_the_cluster() -> None:
    one_decode = resource_bundles(config(), [D])
    assert fits({"CPU": 8, "GPU": 2}, one_decode)
    assert not fits({"CPU": 8, "GPU": 1}, one_decode)
    assert not fits({"CPU": 4, "GPU": 4}, one_decode)
    assert fits({"CPU": 4.25, "GPU": 2, "memory": 1e9}, one_decode)


def test_a_removal_never_goes_under_the_minimum_of_the_role_served_now() -> None:
    serving = {"prefill-0": P, "decode-0": D, "decode-1": D, "decode-2": D, "prefill-1": D}
    assert minimum_kept(config(), serving, "decode-2") is None
    tight = {n: r for n, r in serving.items() if n not in ("decode-2", "prefill-1")}
    assert "the minimum is 2" in minimum_kept(config(), tight, "decode-1")
    assert "the minimum is 1" in minimum_kept(config(), serving, "prefill-0")

"""Tensor-parallel keys in the YAML: where they are accepted, and the errors that name them."""

from __future__ import annotations

import pytest

from cluster.config import parse_config
from engine.errors import ConfigError


def _raw(**sections) -> dict:
    raw = {"model": {"device": "cpu"}, "prefill": {"instances": 0}, "decode": {"instances": 0}}
    raw.update(sections)
    return raw


def test_a_mixed_instance_may_be_tensor_parallel():
    config = parse_config(_raw(mixed={"instances": 1, "engine": {"tensor_parallel_size": 2}}))
    assert config.mixed.engine.tensor_parallel_size == 2
    assert config.prefill.engine.tensor_parallel_size == 1


@pytest.mark.parametrize(("p_size", "d_size"), [(2, 1), (1, 2), (2, 2)])
def test_prefill_and_decode_may_differ_in_size(p_size, d_size):
    raw = _raw(prefill={"instances": 1}, decode={"instances": 1})
    raw["prefill"]["engine"] = {"tensor_parallel_size": p_size}
    raw["decode"]["engine"] = {"tensor_parallel_size": d_size}
    config = parse_config(raw)
    assert config.prefill.engine.tensor_parallel_size == p_size
    assert config.decode.engine.tensor_parallel_size == d_size


def test_a_tensor_parallel_decode_on_gpus_is_refused_by_name():
    raw = _raw(prefill={"instances": 1}, decode={"instances": 1, "engine": {}})
    raw["model"]["device"] = "cuda"
    for role in ("prefill", "decode"):
        raw[role]["placement"] = {"num_gpus": 1}
    raw["decode"]["engine"] = {"tensor_parallel_size": 2}
    with pytest.raises(ConfigError, match=r"decode\.engine\.tensor_parallel_size 2"):
        parse_config(raw)
    raw["decode"]["engine"] = {"tensor_parallel_size": 1}
    raw["prefill"]["engine"] = {"tensor_parallel_size": 2}
    assert parse_config(raw).prefill.engine.tensor_parallel_size == 2


def test_a_size_below_one_names_the_key():
    with pytest.raises(ConfigError, match=r"mixed\.engine\.tensor_parallel_size"):
        parse_config(_raw(mixed={"instances": 1, "engine": {"tensor_parallel_size": 0}}))

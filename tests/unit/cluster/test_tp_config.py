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


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_tensor_parallel_prefill_or_decode_is_refused_by_name(role):
    raw = _raw(prefill={"instances": 1}, decode={"instances": 1})
    raw[role]["engine"] = {"tensor_parallel_size": 2}
    with pytest.raises(ConfigError, match=rf"{role}\.engine\.tensor_parallel_size 2"):
        parse_config(raw)


def test_a_size_below_one_names_the_key():
    with pytest.raises(ConfigError, match=r"mixed\.engine\.tensor_parallel_size"):
        parse_config(_raw(mixed={"instances": 1, "engine": {"tensor_parallel_size": 0}}))

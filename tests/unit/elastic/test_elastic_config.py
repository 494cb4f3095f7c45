"""The slo: and elastic: sections: defaults, and errors that name the key."""

from __future__ import annotations

import pytest

from cluster.config import ElasticConfig, SloConfig, parse_config
from engine.errors import ConfigError


def test_defaults_leave_the_controller_off() -> None:
    config = parse_config({})
    assert config.elastic.enabled is False
    assert config.slo.ttft_ms > 0 and config.slo.tpot_ms > 0


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"slo": {"ttft_ms": 0}}, "slo.ttft_ms"),
        ({"slo": {"attainment_target": 1.5}}, "slo.attainment_target"),
        ({"elastic": {"hysteresis": 0}}, "elastic.hysteresis"),
        ({"elastic": {"decison_interval_s": 1}}, "elastic.decison_interval_s"),
        (
            {"elastic": {"enabled": True, "min_decode_instances": 2}},
            "elastic.min_decode_instances",
        ),
        (
            {"elastic": {"enabled": True}, "prefill": {"engine": {"cache": {"memory_mb": 64}}}},
            "prefill.engine.cache",
        ),
        (
            {"elastic": {"enabled": True}, "decode": {"engine": {"tensor_parallel_size": 2}}},
            "prefill.engine.tensor_parallel_size",
        ),
    ],
)
def test_bad_values_name_their_key(raw: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_config(raw)


def test_every_field_is_described() -> None:
    for model in (SloConfig, ElasticConfig):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name}"

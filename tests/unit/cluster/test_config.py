"""The YAML config tree: every shipped file loads, and a bad one fails naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load_config, parse_config
from engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    load_config(path)


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"prefil": {}}, "prefil"),
        ({"model": {"load_format": "pickle"}}, "model.load_format"),
        ({"decode": {"engine": {"scheduler": {"block_size": 0}}}}, "decode.engine.scheduler"),
        ({"router": {"port": 70000}}, "router.port"),
        (
            {"prefill": {"engine": {"prefill_attention": "flash"}}},
            "prefill.engine.prefill_attention",
        ),
        ({"router": {"placement": "head"}}, "router.placement"),
        ({"prefill": {"instances": 1}, "decode": {"instances": 0}}, "decode.instances"),
        (
            {"model": {"device": "cuda"}, "decode": {"placement": {"num_gpus": 1}}},
            "prefill.placement.num_gpus",
        ),
    ],
)
def test_bad_values_name_their_key(raw: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_config(raw)


def test_bad_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    broken.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(broken)

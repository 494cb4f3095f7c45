"""`model.load_format: random`: a folder's config.json with seeded random weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.unit.worker.conftest import make_prompts
from tests.unit.worker.test_loader_and_model import _prefill_logits
from worker.loader import load_model
from worker.model_config import ModelLoadError


def _config_only(checkpoint: Path, dst: Path) -> Path:
    """The checkpoint's folder without any weights file."""
    dst.mkdir()
    shutil.copy(checkpoint / "config.json", dst / "config.json")
    return dst


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_random_weights_are_the_same_in_every_load(checkpoints, tmp_path: Path, name) -> None:
    folder = _config_only(checkpoints[name].path, tmp_path / name)
    first = load_model(folder, "float32", "cpu", load_format="random")
    second = load_model(folder, "float32", "cpu", load_format="random")
    prompt = make_prompts(1, seed=3)[0]
    logits = _prefill_logits(first, prompt)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, _prefill_logits(second, prompt))  # a P and a D agree
    # Not a degenerate model: different positions predict different distributions.
    assert not torch.allclose(logits[0], logits[-1])
    config = json.loads((folder / "config.json").read_text())
    assert first.weights.embed.shape == (config["vocab_size"], config["hidden_size"])


def test_unknown_load_format_is_refused(checkpoints) -> None:
    with pytest.raises(ModelLoadError, match="load_format"):
        load_model(checkpoints["llama"].path, "float32", "cpu", load_format="pickle")

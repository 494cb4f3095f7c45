"""A tiny random Llama checkpoint (written once per session) for the instance loops."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import EngineConfig, ModelConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.unit.worker.conftest import build_checkpoint
from worker.engine_core import EngineCore


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("instances") / "llama"
    build_checkpoint("llama", folder)
    return folder


@pytest.fixture(scope="session")
def offline(tiny_model):
    """Greedy tokens of one engine stepped directly (no loop, no instance): the reference."""
    from tests.unit.instances.harness import ENGINE

    core = EngineCore(
        ModelConfig(path=str(tiny_model), device="cpu", dtype="float32"),
        EngineConfig.model_validate(ENGINE),
    )
    cache: dict = {}

    def generate(prompt: list[int], max_tokens: int = 6) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            request = Request("ref", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))
            core.add_request(request)
            while core.has_work():
                core.step()
            cache[key] = list(request.output_token_ids)
        return cache[key]

    return generate


@pytest.fixture
def pd(tiny_model):
    """`pd(decodes=1, **sections)` -> a P with `decodes` D loops and a stand-in router, closed
    after the test."""
    from tests.unit.instances.harness import PD, Router, make_config

    made: list = []

    def build(decodes: int = 1, **sections):
        made.append((PD(make_config(tiny_model, **sections), decodes), Router()))
        return made[-1]

    yield build
    for cluster, router in made:
        cluster.close()
        router.close()

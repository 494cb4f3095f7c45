"""1P1D over the TCP transfer backend (zmq frames) and a colocated (mixed) instance: the same
identity test as NIXL."""

from __future__ import annotations

import pytest

from tests.integration.conftest import MAX_TOKENS
from tests.integration.harness import assert_all_free, prompts, run_load, small_config, start

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dep():
    config = small_config(transfer={"backend": "tcp"}, mixed={"instances": 1})
    deployment = start(config)
    yield deployment
    deployment.stop()


def test_tcp_backend_matches_single_engine(dep, reference_outputs) -> None:
    prompt_list = prompts()
    texts = run_load(dep.url, prompt_list, MAX_TOKENS)
    for prompt, text in zip(prompt_list, texts, strict=True):
        assert text == reference_outputs[prompt], prompt
    stats = assert_all_free(dep)
    assert stats["messager-0"]["transfer"]["writes"] > 0
    # The router spreads requests over P and the mixed instance; both must be right.
    assert stats["mixed-0"]["counters"].get("requests", 0) > 0

"""Nothing compiles once an engine is ready: the start-up warm-up (worker/warmup.py) reaches
every Triton kernel variant that serving can reach, whatever the batch shapes, prompt lengths,
prefix hits and sampling options of the requests that follow."""

from __future__ import annotations

import random

import pytest
import torch

from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.gpu.test_gpu_engine import make_core, models  # noqa: F401 (a fixture)
from tests.unit.engine.helpers import assert_nothing_leaked
from worker.warmup import kernel_variants

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def varied_requests(vocab: int, seed: int) -> list[Request]:
    """Lengths from 1 token to several chunks, shared prefixes, every sampling option."""
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(70)]
    options = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_p=0.9, top_k=20),
        dict(temperature=1.0, seed=7, presence_penalty=0.4, frequency_penalty=0.3),
        dict(temperature=0.0, logprobs=3),
    ]
    out = []
    for i in range(24):
        length = rng.choice([1, 2, 15, 16, 17, 33, 100, 257, 400])
        prompt = [rng.randrange(vocab) for _ in range(length)]
        if i % 5 == 0:
            prompt = shared + prompt  # a prefix-cache hit: the chunk starts past cached blocks
        params = SamplingParams(
            max_tokens=rng.randint(1, 40), ignore_eos=True, **options[i % len(options)]
        )
        out.append(Request(f"r{i}", prompt, params))
    return out


@pytest.mark.parametrize(("name", "dtype"), [("mid", "bfloat16"), ("mistral", "float32")])
def test_serving_after_warm_up_compiles_nothing(models, name, dtype) -> None:  # noqa: F811
    path, hf_model = models[name]
    core = make_core(path, dtype, overlap=True, num_blocks=512)
    ready = kernel_variants()
    assert core.warmup_s > 0 and ready
    pending = varied_requests(hf_model.config.vocab_size, seed=1)
    steps = 0
    while pending or core.has_work():
        for _ in range(random.Random(steps).randint(0, 3)):  # arrivals between steps
            if pending:
                core.add_request(pending.pop())
        core.step()
        steps += 1
        assert steps < 5000
    assert_nothing_leaked(core.scheduler)
    print(f"{name} {dtype}: {len(ready)} kernel variants at ready, warm-up {core.warmup_s:.1f} s")
    new = sorted(kernel_variants() - ready)
    assert not new, "compiled after ready:\n" + "\n".join(new)

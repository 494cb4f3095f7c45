"""Warm-up: every kernel variant an engine can reach runs once before it reports ready.

Triton compiles a kernel variant the first time a launch needs it (a new constexpr, dtype or
argument specialization), and a compile takes a good part of a second -- in the middle of
serving, that is a request's TTFT. The launches are written so that batch shapes do not make new
variants (per-step integers are not specialized, metadata pointers are 16-byte aligned), which
leaves a small fixed set; the scratch requests below reach all of it: a prefill in several
chunks (a cached prefix before a chunk), a short sequence decoding in one split and a long one
in several, steps mixing prefill chunks with decode rows, and every sampling option. Decode
CUDA graphs are captured earlier, when the runner is built. With a step budget of more than
about 540 tokens the long request's first chunk (the budget less the other requests' rows) is
512 tokens or more and goes to FlashAttention (`engine.prefill_attention` auto), so its kernels
(not Triton's; CUDA loads them on first use) are loaded before ready too. cuDNN's attention,
SDPA's pick for that path on Hopper, builds a plan per (padded) chunk length: one fresh prompt
of each length the step budget allows builds them all (`flash_lengths`).

The scratch requests run on the engine's own runner and KV cache, but through a scheduler and
block manager of their own, so the engine's real ones (and its prefix cache) never see them;
the blocks they wrote are free in the real block manager and hold nothing anyone reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from engine.block_manager import BlockManager
from engine.config import Role
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

if TYPE_CHECKING:
    from worker.engine_core import EngineCore

log = logging.getLogger(__name__)

_MAX_STEPS = 1000  # a few dozen are needed; more means the scheduler cannot finish them
_SPLIT_KEYS = 64  # a decode of more keys than this takes several splits (triton_paged.py)
_NEW_TOKENS = 8
_ONE_TOKEN = SamplingParams(temperature=0.0, seed=1, max_tokens=1, ignore_eos=True)


def warm_up(core: EngineCore, flash_lengths: Sequence[int] = ()) -> float:
    """Run the scratch requests to completion on `core`'s runner; returns the seconds taken.
    `flash_lengths`: one fresh prompt of each length runs alone too (FlashAttention's
    per-length plans, `triton_paged.flash_plan_lengths`)."""
    started = time.monotonic()
    real = core.scheduler, core.block_manager
    sched_cfg = core.scheduler.config
    blocks = BlockManager(real[1].num_blocks, sched_cfg.block_size, enable_prefix_caching=False)
    core.block_manager = blocks
    core.scheduler = Scheduler(sched_cfg, blocks, core.max_model_len, Role.MIXED)
    try:
        short, long, mixed_short, mixed_long = _requests(core)
        steps = [0]
        # Decode rows of short sequences only (one split) beside a prefill chunk, then a long
        # sequence's (several splits) beside one: each a step that runs eagerly.
        core.add_request(short)
        _step_until(core, steps, lambda: _decoding(short))
        core.add_request(mixed_short)
        core.add_request(long)
        _step_until(core, steps, lambda: _decoding(long))
        core.add_request(mixed_long)
        _step_until(core, steps, lambda: not core.has_work())
        core.step()  # the finished requests' release reaches the runner
        limit = _limit(core)
        for length in [n for n in flash_lengths if n <= limit]:
            core.add_request(Request(f"warmup-flash-{length}", _tokens(length), _ONE_TOKEN))
            _step_until(core, steps, lambda: not core.has_work())
            core.step()
    finally:
        core.scheduler, core.block_manager = real
    seconds = time.monotonic() - started
    log.info("warm-up: every kernel variant ran once in %.1f s", seconds)
    return seconds


def _step_until(core: EngineCore, steps: list[int], done: Callable[[], bool]) -> None:
    while not done():
        if steps[0] >= _MAX_STEPS or not core.has_work():
            raise RuntimeError(f"warm-up stuck after {steps[0]} steps")
        core.step()
        steps[0] += 1


def _decoding(request: Request) -> bool:
    """Its prompt is computed: its next chunks are decode rows (or it has finished)."""
    return request.num_computed_tokens >= request.num_prompt_tokens


def _limit(core: EngineCore) -> int:
    """The longest scratch prompt: within max_model_len and half the KV cache."""
    capacity = core.block_manager.num_blocks * core.scheduler.config.block_size // 2
    return min(core.max_model_len, capacity) - _NEW_TOKENS - 1


def _requests(core: EngineCore) -> list[Request]:
    cfg = core.scheduler.config
    limit = _limit(core)
    # Long enough to take several decode splits and, with chunked prefill, several chunks.
    long_len = max(1, min(limit, max(4 * _SPLIT_KEYS, 2 * cfg.max_num_batched_tokens + 17)))
    # Every request carries a seed, greedy ones too: the sampler's own generator (for requests
    # without one) must be where it would be without the warm-up.
    greedy = SamplingParams(temperature=0.0, seed=1, max_tokens=_NEW_TOKENS, ignore_eos=True)
    sampled = SamplingParams(
        temperature=0.8,
        top_p=0.9,
        top_k=20,
        seed=1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logprobs=2,
        max_tokens=_NEW_TOKENS,
        ignore_eos=True,
    )
    return [
        Request("warmup-short", _tokens(min(8, limit)), greedy),
        Request("warmup-long", _tokens(long_len), sampled),
        Request("warmup-mixed-short", _tokens(min(24, limit)), sampled),
        Request("warmup-mixed-long", _tokens(min(24, limit)), greedy),
    ]


def _tokens(n: int) -> list[int]:
    return [1 + i % 97 for i in range(n)]


def kernel_variants() -> set[str]:
    """The variants of the engine's Triton kernels this process has compiled or loaded, as
    "kernel: specialization" (for tests and benchmarks: the set must not grow once an instance
    is ready)."""
    from worker.attention import triton_kernels
    from worker.models import triton_ops

    found = set()
    for module in (triton_kernels, triton_ops):
        for name in dir(module):
            caches = getattr(getattr(module, name), "device_caches", None)
            for cache in caches.values() if caches is not None else ():
                found |= {f"{name}: {key}" for key in cache[0]}
    return found

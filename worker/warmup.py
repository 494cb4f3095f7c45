"""Warm-up: every kernel variant an engine can reach runs once before it reports ready.

Triton compiles a kernel variant the first time a launch needs it (a new constexpr, dtype or
argument specialization), and a compile takes a good part of a second -- in the middle of
serving, that is a request's TTFT. The launches are written so that batch shapes do not make new
variants (per-step integers are not specialized, metadata pointers are 16-byte aligned), which
leaves a small fixed set; the scratch requests below reach all of it: a prefill in several
chunks (a cached prefix before a chunk), a short sequence decoding in one split and a long one
in several, steps mixing prefill chunks with decode rows, and every sampling option. Decode
CUDA graphs are captured earlier, when the runner is built.

The scratch requests run on the engine's own runner and KV cache, but through a scheduler and
block manager of their own, so the engine's real ones (and its prefix cache) never see them;
the blocks they wrote are free in the real block manager and hold nothing anyone reads.
"""

from __future__ import annotations

import logging
import time
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
_NEW_TOKENS = 4


def warm_up(core: EngineCore) -> float:
    """Run the scratch requests to completion on `core`'s runner; returns the seconds taken."""
    started = time.monotonic()
    real = core.scheduler, core.block_manager
    sched_cfg = core.scheduler.config
    blocks = BlockManager(real[1].num_blocks, sched_cfg.block_size, enable_prefix_caching=False)
    core.block_manager = blocks
    core.scheduler = Scheduler(sched_cfg, blocks, core.max_model_len, Role.MIXED)
    try:
        later = _add_requests(core)
        for _ in range(_MAX_STEPS):
            if not core.has_work():
                break
            core.step()
            if later and core.scheduler.running:  # joins decoding ones: a mixed step
                core.add_request(later.pop())
        else:
            raise RuntimeError(f"warm-up did not finish within {_MAX_STEPS} steps")
        core.step()  # the finished requests' release reaches the runner
    finally:
        core.scheduler, core.block_manager = real
    seconds = time.monotonic() - started
    log.info("warm-up: every kernel variant ran once in %.1f s", seconds)
    return seconds


def _add_requests(core: EngineCore) -> list[Request]:
    """Queue the first scratch requests; returns the one to add once others decode."""
    cfg = core.scheduler.config
    capacity = core.block_manager.num_blocks * cfg.block_size // 2
    limit = min(core.max_model_len, capacity) - _NEW_TOKENS - 1
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
    short = min(8, limit)
    core.add_request(Request("warmup-short", _tokens(short), greedy))
    core.add_request(Request("warmup-long", _tokens(long_len), sampled))
    return [Request("warmup-mixed", _tokens(min(24, limit)), sampled)]


def _tokens(n: int) -> list[int]:
    return [1 + i % 97 for i in range(n)]


def compiled_kernel_variants() -> int:
    """How many variants of the engine's Triton kernels this process has compiled or loaded
    (for tests and benchmarks: it must not grow once an instance is ready)."""
    from worker.attention import triton_kernels
    from worker.models import triton_ops

    kernels = [
        getattr(module, name)
        for module in (triton_kernels, triton_ops)
        for name in dir(module)
        if hasattr(getattr(module, name), "device_caches")
    ]
    return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())

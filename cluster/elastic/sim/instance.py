"""One simulated instance: the real engine Scheduler and BlockManager, stepped by the clock.

Tokens are quantized: one simulated token stands for `quantum` real tokens (prompt and output
lengths, block size and the step budget are divided by it; step times are computed for the real
token counts), so a 256-instance run replays millions of tokens in seconds. quantum 1 is exact.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from cluster.elastic.sim.cost import CostModel
from engine.batch import ScheduledChunk, SchedulerOutput
from engine.block_manager import BlockManager
from engine.config import Role, SchedulerConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


@dataclass
class SimRequest:
    """A trace request on its way through the simulated cluster (times in simulated seconds)."""

    index: int
    arrival_s: float
    prompt_tokens: int  # real tokens
    output_tokens: int  # real tokens
    sim_prompt: int
    sim_output: int  # simulated tokens: the first (from P) is one real token, each later one
    # stands for `quantum` real tokens
    sent_s: float = 0.0  # when the client sent it (after its concurrency slot)
    prefill: str = ""  # the instance that computes the prompt
    decode: str = ""  # the instance that decodes (PD)
    sim_out: int = 0  # simulated output tokens so far
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished: bool = False
    error: str = ""
    attempt: int = 0  # retries change the id the instances see

    @property
    def engine_id(self) -> str:
        return f"{self.index}~{self.attempt}"


class SimInstance:
    def __init__(
        self,
        name: str,
        role: Role,
        configs: dict[Role, SchedulerConfig],
        num_blocks: int,
        cost: CostModel,
        quantum: int,
        max_model_len: int,
    ) -> None:
        self.name = name
        self.configs = configs
        self.cost = cost
        self.quantum = quantum
        block_size = max(1, configs[role].block_size // quantum)
        real_positions = num_blocks * configs[role].block_size
        self._blocks = (real_positions // (block_size * quantum), block_size)
        self._max_len = max_model_len // quantum
        self.accepting = True  # False while draining for a switch or removal
        self.stepping = False
        self.step_event: int | None = None
        self.prepare_queue: deque[SimRequest] = deque()  # P: waiting for blocks / backlog / D
        self.busy_s = 0.0  # time spent in steps, cumulative
        self.tracked: dict[str, SimRequest] = {}  # engine id -> request, while it is here
        self.switching_to: Role | None = None  # set while draining for a switch
        self.reset(role)

    def reset(self, role: Role | None = None) -> None:
        """Empty engine state, serving (a fresh start, or a restart after a crash)."""
        role = role or self.scheduler.role
        num_blocks, block_size = self._blocks
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        config = _scaled(self.configs[role], self.quantum, role)
        self.scheduler = Scheduler(config, self.block_manager, self._max_len, role)
        self.alive = True
        self.accepting = True
        self.stepping = False
        self.step_event = None
        self.switching_to = None
        self.prepare_queue.clear()
        self.tracked.clear()

    @property
    def role(self) -> Role:
        return self.scheduler.role

    def set_role(self, role: Role) -> None:
        self.scheduler.switch_role(role, _scaled(self.configs[role], self.quantum, role))

    # ------------------------------------------------------------------ what it reports
    def backlog_tokens(self) -> int:
        """Real prompt tokens queued here and not computed yet."""
        queued = sum(r.num_tokens - r.num_computed_tokens for r in self.scheduler.waiting)
        return queued * self.quantum + sum(r.prompt_tokens for r in self.prepare_queue)

    def queued_prompt_tokens(self) -> int:
        """Real prompt tokens admitted to the scheduler and not computed yet (what P's
        `prefill.max_backlog_tokens` bounds)."""
        queued = 0
        for r in self.scheduler.waiting:
            queued += r.num_prompt_tokens - r.num_computed_tokens
        for r in self.scheduler.running:
            queued += max(0, r.num_prompt_tokens - r.num_computed_tokens)
        return queued * self.quantum

    def kv_usage(self) -> float:
        return self.block_manager.usage

    def holds_nothing(self) -> bool:
        return not self.scheduler.requests and not self.prepare_queue and not self.stepping

    # ------------------------------------------------------------------ the step
    def step_time(self, out: SchedulerOutput) -> float:
        """Real time of the scheduled step: prefill chunks in real tokens; a decode chunk is
        `quantum` real decode steps."""
        k = self.quantum
        prefill = [(c.start_pos * k, c.num_tokens * k) for c in out.chunks if not _decodes(c)]
        contexts = [c.start_pos * k for c in out.chunks if _decodes(c)]
        seconds = self.cost.step_s(prefill, contexts)
        if contexts and k > 1:
            seconds += (k - 1) * self.cost.step_s([], [c + k / 2 for c in contexts])
        return seconds


def _scaled(config: SchedulerConfig, quantum: int, role: Role) -> SchedulerConfig:
    """The step budget counts prompt tokens in simulated tokens, but a decode chunk is one
    token per request whatever the quantum: so decode keeps its real budget."""
    if quantum == 1:
        return config
    budget = config.max_num_batched_tokens
    if role is not Role.DECODE:
        budget = max(1, budget // quantum)
    return config.model_copy(
        update={
            "block_size": max(1, config.block_size // quantum),
            "max_num_batched_tokens": budget,
            "enable_prefix_caching": False,
        }
    )


def _decodes(chunk: ScheduledChunk) -> bool:
    return chunk.is_decode


_PARAMS: dict[int, SamplingParams] = {}
_PROMPTS: dict[int, list[int]] = {}
TOKEN = 7  # every sampled token; no EOS is set, so requests end at their max_tokens


def engine_request(request: SimRequest, prompt_tokens: int, max_tokens: int) -> Request:
    """An engine Request for `request` (prompts are shared lists: without a prefix cache only
    their length matters)."""
    params = _PARAMS.get(max_tokens)
    if params is None:
        params = _PARAMS[max_tokens] = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True
        )
    prompt = _PROMPTS.get(prompt_tokens)
    if prompt is None:
        prompt = _PROMPTS[prompt_tokens] = [TOKEN] * prompt_tokens
    return Request(request.engine_id, prompt, params, arrival_time=request.arrival_s)


def sim_lengths(prompt_tokens: int, output_tokens: int, quantum: int) -> tuple[int, int]:
    """Simulated prompt and output lengths: the first output token is one real token."""
    return (
        max(1, math.ceil(prompt_tokens / quantum)),
        1 + math.ceil(max(output_tokens - 1, 0) / quantum),
    )


def real_tokens_out(sim_tokens: int, output_tokens: int, quantum: int) -> int:
    """Real tokens produced once `sim_tokens` simulated tokens are out."""
    return min(output_tokens, 1 + (sim_tokens - 1) * quantum) if sim_tokens else 0

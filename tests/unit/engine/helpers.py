"""Test helpers for the engine: a fake 'model' that samples deterministic tokens, leak checks."""

from __future__ import annotations

from engine.batch import ModelRunnerOutput, SchedulerOutput
from engine.block_manager import BlockManager
from engine.config import Role, SchedulerConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    role: Role = Role.MIXED,
    max_model_len: int = 1024,
    **config,
) -> Scheduler:
    cfg = SchedulerConfig(block_size=block_size, **config)
    blocks = BlockManager(num_blocks, block_size, cfg.enable_prefix_caching)
    return Scheduler(cfg, blocks, max_model_len=max_model_len, role=role)


def make_request(rid: str, prompt: list[int], max_tokens: int = 4, **params) -> Request:
    return Request(
        rid, list(prompt), SamplingParams(temperature=0, max_tokens=max_tokens, **params)
    )


def next_token_rule(tokens: list[int]) -> int:
    """A deterministic stand-in for a model: the next token depends on the whole sequence."""
    return (sum(tokens) * 31 + len(tokens)) % 1000 + 3


def fake_run(sched: Scheduler, out: SchedulerOutput) -> ModelRunnerOutput:
    sampled: list[int | None] = []
    for chunk in out.chunks:
        if chunk.sample:
            request = sched.requests[chunk.request_id]
            sampled.append(next_token_rule(request.all_token_ids[: chunk.end_pos]))
        else:
            sampled.append(None)
    return ModelRunnerOutput(out.step_id, [c.request_id for c in out.chunks], sampled)


def run_to_completion(sched: Scheduler, max_steps: int = 10_000) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_work():
            return outputs
        out = sched.schedule()
        assert out.num_tokens <= sched.config.max_num_batched_tokens or not (
            sched.config.enable_chunked_prefill
        )
        for delta in sched.update_from_output(out, fake_run(sched, out)):
            outputs.setdefault(delta.request_id, []).extend(delta.new_token_ids)
        sched.check_invariants()
    raise AssertionError("scheduler did not finish")


def expected_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token_rule(tokens))
    return tokens[len(prompt) :]


def assert_nothing_leaked(sched: Scheduler) -> None:
    sched.check_invariants()
    assert not sched.requests, f"requests left: {list(sched.requests)}"
    assert not sched.running and not sched.waiting
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    assert all(b.ref_count == 0 for b in bm.blocks)

"""The runner state that keeps per-step host work independent of context length: block tables
on the device, penalty counts on the device, counter-based seeded noise."""

from __future__ import annotations

import torch

from engine.batch import ScheduledChunk
from engine.request import Request
from engine.sampling_params import SamplingParams
from worker.attention.block_tables import BlockTables
from worker.attention.packing import IntPacker
from worker.penalties import PenaltyCounts
from worker.sampler import Sampler, SamplingRow, counter_exponential, mix_seed

CPU = torch.device("cpu")
BS = 4


def chunk(rid: str, start: int, n: int, blocks: list[int]) -> ScheduledChunk:
    return ScheduledChunk(rid, [1] * n, start, blocks, True, SamplingParams())


def step(tables: BlockTables, chunks: list[ScheduledChunk]) -> tuple[list[int], int]:
    """Stage and apply one step; returns the rows and how many entries were sent."""
    packer = IntPacker()
    rows = tables.stage(packer, chunks)
    sent = packer.spans["table_index"][1] - packer.spans["table_index"][0]
    tables.apply(packer.to_device(CPU))
    return rows, sent


def table(tables: BlockTables, row: int, n: int) -> list[int]:
    return tables.tables[row, :n].tolist()


def test_a_step_sends_only_the_blocks_gained() -> None:
    tables = BlockTables(BS, max_blocks=8, device=CPU, rows=2)
    a, b = [5, 9], [3]
    rows, sent = step(tables, [chunk("a", 0, 7, a), chunk("b", 0, 2, b)])
    assert sent == 3
    assert table(tables, rows[0], 2) == [5, 9] and table(tables, rows[1], 1) == [3]
    _, sent = step(tables, [chunk("a", 7, 1, a), chunk("b", 2, 1, b)])
    assert sent == 0  # both still inside their last block
    a.append(11)  # the scheduler appends to the request's own list
    rows, sent = step(tables, [chunk("a", 8, 1, a), chunk("b", 3, 1, b)])
    assert sent == 1 and table(tables, rows[0], 3) == [5, 9, 11]


def test_released_and_replaced_tables_are_rewritten_and_rows_grow() -> None:
    tables = BlockTables(BS, max_blocks=8, device=CPU, rows=1)
    first = [1, 2]
    step(tables, [chunk("a", 0, 6, first)])
    tables.release(["a"])
    rows, sent = step(tables, [chunk("a", 0, 6, [7, 8])])  # preempted, readmitted elsewhere
    assert sent == 2 and table(tables, rows[0], 2) == [7, 8]
    rows, sent = step(tables, [chunk("a", 6, 1, [4, 6])])  # id reused without a release
    assert sent == 2 and table(tables, rows[0], 2) == [4, 6]
    rows, _ = step(tables, [chunk(f"r{i}", 0, 3, [i]) for i in range(5)])  # more rows than made
    assert len(set(rows)) == 5 and tables.tables.shape[0] >= 6
    assert [table(tables, r, 1)[0] for r in rows] == list(range(5))


def test_gathered_tables_match_the_chunks() -> None:
    tables = BlockTables(BS, max_blocks=8, device=CPU)
    chunks = [chunk("a", 0, 9, [4, 2, 7]), chunk("b", 0, 3, [6])]
    rows, _ = step(tables, chunks)
    got = tables.gather(torch.tensor(rows), 3)
    assert got[0].tolist() == [4, 2, 7] and got[1, 0] == 6


def test_penalty_counts_follow_the_draws() -> None:
    counts = PenaltyCounts(CPU, rows=1)
    got, kept, slots = counts.counts_for(["a", None], [[3, 3, 5], [2, -1]], vocab=8)
    assert got[0, 3] == 2 and got[0, 5] == 1 and got[1, 2] == 1 and got.sum() == 4
    assert kept == [0]
    counts.add_sampled(slots, torch.tensor([5]))
    got, _, _ = counts.counts_for(["a"], [None], vocab=8)  # kept: no output needed
    assert got[0].tolist() == [0, 0, 0, 2, 0, 2, 0, 0]
    got, _, _ = counts.counts_for(["a"], [[1]], vocab=8)  # rebuilt (readmitted)
    assert got[0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    counts.release(["a"])
    assert counts.num_requests == 0


def test_sampler_penalizes_the_tokens_it_drew_before() -> None:
    """Greedy with a strong presence penalty never repeats a token: the runner sends the
    output once, the sampler counts each draw itself."""
    logits = torch.tensor([[3.0, 2.8, 2.6, 2.4, 2.2, 0.5]])
    params = SamplingParams(temperature=0.0, presence_penalty=2.0)
    sampler = Sampler(CPU)
    drawn = [int(sampler(logits, [SamplingRow(params, 0, [], "r")])[0])]
    for n in range(1, 5):
        drawn.append(int(sampler(logits, [SamplingRow(params, n, None, "r")])[0]))
    assert drawn == [0, 1, 2, 3, 4]


def test_counter_noise_is_exponential_and_keyed() -> None:
    keys = torch.tensor([mix_seed(s, 0) for s in range(64)])
    noise = counter_exponential(keys, 4096)  # [64, 4096]
    assert torch.all(noise > 0)
    assert abs(noise.mean().item() - 1.0) < 0.02 and abs(noise.var().item() - 1.0) < 0.05
    again = counter_exponential(keys[5:6], 4096)
    assert torch.equal(again[0], noise[5])  # a row depends on its key only
    other = counter_exponential(torch.tensor([mix_seed(5, 1)]), 4096)
    assert not torch.equal(other[0], noise[5])


def test_seeded_frequencies_follow_the_distribution() -> None:
    n = 20000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    rows = [SamplingRow(SamplingParams(temperature=0.7, seed=s), 3) for s in range(n)]
    counts = torch.bincount(Sampler(CPU)(logits.repeat(n, 1), rows), minlength=5)
    expected = (logits[0] / 0.7).softmax(-1)
    torch.testing.assert_close(counts.float() / n, expected, atol=0.015, rtol=0)


def test_token_slice_reads_prompt_and_output_without_joining_them() -> None:
    request = Request("r", [1, 2, 3], SamplingParams())
    request.output_token_ids = [4, 5]
    assert request.token_slice(0, 5) == [1, 2, 3, 4, 5]
    assert request.token_slice(2, 4) == [3, 4]
    assert request.token_slice(4, 5) == [5]
    assert request.token_slice(5, 6) == []  # not sampled yet: the placeholder's position

"""CUDA graphs of the decode forward (embedding .. logits), one per batch-size bucket.

A decode step of a small model is hundreds of short kernels; launched one by one from Python,
the launches take longer than the kernels. Each bucket's graph is captured once at start-up
over static buffers; a step of B sequences replays the smallest bucket >= B, with rows B..b as
padding (cache slot -1: nothing written; length 0: attention reads nothing). Sampling stays
outside the graph (it varies per request). Steps that are not plain decodes run eagerly (in a
mixed instance: every step that holds a prefill chunk).

Inputs per replay: one host->device copy of the step's integers (ids, positions, slots,
lengths, the table rows of the sequences, and the block-table entries they gained: see
worker/attention/block_tables.py, shared with the eager steps), then on the device the head is
copied into the bucket's static buffer and the sequences' table rows are gathered into the
graph's static tables. No host work grows with the context length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.batch import ScheduledChunk
from worker.attention.block_tables import BlockTables
from worker.attention.packing import IntPacker
from worker.attention.triton_metadata import TritonAttentionMetadata, TritonDecode
from worker.models import LlamaForCausalLM

if TYPE_CHECKING:  # Triton itself is imported only where it is installed
    from worker.attention.triton_paged import TritonPagedAttention

# Fields of a bucket's `head` buffer, each `size` long, in this order.
_FIELDS = ("ids", "positions", "slots", "lens")


def default_batch_sizes(max_num_seqs: int) -> list[int]:
    """Buckets: 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always one)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted({*sizes, max_num_seqs})


@dataclass
class _Bucket:
    size: int
    head: torch.Tensor  # [4 * size] int64, see _FIELDS
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [size, V], written by each replay

    def field(self, name: str) -> torch.Tensor:
        i = _FIELDS.index(name)
        return self.head[i * self.size : (i + 1) * self.size]


class DecodeGraphs:
    """Captured decode forwards for a fixed model, cache and Triton backend."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        attention: TritonPagedAttention,
        kv_layers: list[torch.Tensor],
        block_size: int,
        max_model_len: int,
        batch_sizes: list[int],
        sliding_window: int | None,
    ) -> None:
        self.model = model
        self.attention = attention
        self.kv_layers = kv_layers
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.sliding_window = sliding_window
        device = kv_layers[0].device
        biggest = max(batch_sizes)
        # The graphs' static tables: each replay gathers its sequences' rows into them.
        self.tables = torch.zeros(biggest, self.max_blocks, dtype=torch.int64, device=device)
        self.rows = torch.arange(biggest, device=device)
        self.buckets = [_Bucket(b, self._empty_head(b, device)) for b in sorted(batch_sizes)]
        self.replays = 0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1].size

    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, sharing one memory pool."""
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        for bucket in reversed(self.buckets):
            with torch.cuda.stream(stream):  # warm-up compiles the kernels; it writes nothing
                self._forward(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                bucket.logits = self._forward(bucket)
            bucket.graph = graph
            pool = graph.pool()
        torch.cuda.synchronize()

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        """A plain decode batch that fits a bucket."""
        if not chunks or len(chunks) > self.max_batch:
            return False
        limit = self.max_blocks * self.block_size
        return all(c.num_tokens == 1 and c.sample and c.end_pos <= limit for c in chunks)

    def run(
        self,
        chunks: list[ScheduledChunk],
        fill_placeholders: Callable[[torch.Tensor, list[ScheduledChunk]], None],
        block_tables: BlockTables,
    ) -> torch.Tensor:
        """Replay for `chunks` (see can_run) -> logits `[B, V]` (a view of a static buffer,
        valid until the next replay of the same bucket). `block_tables` must have the graphs'
        width (max_model_len's blocks)."""
        assert block_tables.max_blocks == self.max_blocks
        n = len(chunks)
        bucket = next(b for b in self.buckets if b.size >= n)
        packer = IntPacker()
        packer.add("head", self._host_head(chunks, bucket.size))
        packer.add("rows", block_tables.stage(packer, chunks))
        t = packer.to_device(self.tables.device)
        block_tables.apply(t)
        bucket.head.copy_(t["head"])
        torch.index_select(block_tables.tables, 0, t["rows"], out=self.tables[:n])
        fill_placeholders(bucket.field("ids")[:n], chunks)
        assert bucket.graph is not None and bucket.logits is not None, "capture() first"
        bucket.graph.replay()
        self.replays += 1
        return bucket.logits[:n]

    def _host_head(self, chunks: list[ScheduledChunk], size: int) -> list[int]:
        bs = self.block_size
        pad = size - len(chunks)
        ids = [c.token_ids[0] for c in chunks] + [0] * pad
        positions = [c.start_pos for c in chunks] + [0] * pad
        slots = [c.block_ids[c.start_pos // bs] * 2 * bs + c.start_pos % bs for c in chunks]
        lens = [c.end_pos for c in chunks] + [0] * pad
        return ids + positions + slots + [-1] * pad + lens

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        """The captured work: the model forward and the logits."""
        b = bucket.size
        decode = TritonDecode(
            num_seqs=b,
            rows=self.rows[:b],
            tables=self.tables[:b, : self.max_blocks],
            lens=bucket.field("lens"),
            max_len=self.max_blocks * self.block_size,  # fixes the split count of the graph
        )
        meta = TritonAttentionMetadata(
            b, self.block_size, bucket.field("slots"), decode, None, self.sliding_window
        )
        hidden = self.model.forward(
            bucket.field("ids"), bucket.field("positions"), meta, self.kv_layers
        )  # [b, H]
        return self.model.compute_logits(hidden)  # [b, V]

    def _empty_head(self, size: int, device: torch.device) -> torch.Tensor:
        """A head that touches nothing: slots -1, lengths 0."""
        head = torch.zeros(len(_FIELDS) * size, dtype=torch.int64)
        head[2 * size : 3 * size] = -1
        return head.to(device)

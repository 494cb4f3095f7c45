"""CUDA graphs of the decode forward (embedding .. logits), one per batch-size bucket.

A decode step of a small model is hundreds of short kernels; launched one by one from Python,
the launches take longer than the kernels. Each bucket's graph is captured once at start-up
over static buffers; a step of B sequences replays the smallest bucket >= B, with rows B..b as
padding (cache slot -1: nothing written; length 0: attention reads nothing). Sampling stays
outside the graph (it varies per request). Steps that are not plain decodes run eagerly.

Inputs per replay: one host->device copy of `head` (ids, positions, slots, lengths, and the
block-table entries that changed). The block tables live on the device between steps: when
the batch holds the same requests in the same rows as the last replay, only the blocks each
sequence gained are sent (usually none; one when a sequence crosses into a new block), and
the graph scatters them into the tables itself. Otherwise the tables are rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.batch import ScheduledChunk
from worker.attention.triton_metadata import TritonAttentionMetadata, TritonDecode
from worker.models import LlamaForCausalLM

if TYPE_CHECKING:  # Triton itself is imported only where it is installed
    from worker.attention.triton_paged import TritonPagedAttention

# Fields of a bucket's `head` buffer, each `size` long, in this order.
_FIELDS = ("ids", "positions", "slots", "lens", "update_index", "update_value")


def default_batch_sizes(max_num_seqs: int) -> list[int]:
    """Buckets: 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always one)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted({*sizes, max_num_seqs})


@dataclass
class _Bucket:
    size: int
    head: torch.Tensor  # [6 * size] int64, see _FIELDS
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
        # One spare column: the sink that unused table-update entries write to.
        self.tables = torch.zeros(biggest, self.max_blocks + 1, dtype=torch.int64, device=device)
        self.rows = torch.arange(biggest, device=device)
        self.buckets = [_Bucket(b, self._empty_head(b, device)) for b in sorted(batch_sizes)]
        # Which request sits in each table row, and how many of its blocks the device holds.
        self._row_requests: tuple[str, ...] = ()
        self._row_blocks: list[int] = []
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

    def invalidate(self) -> None:
        """Forget the rows: the next replay rewrites the block tables (after an eager step, or
        when a request was released, its blocks may have changed)."""
        self._row_requests = ()
        self._row_blocks = []

    def run(
        self,
        chunks: list[ScheduledChunk],
        fill_placeholders: Callable[[torch.Tensor, list[ScheduledChunk]], None],
    ) -> torch.Tensor:
        """Replay for `chunks` (see can_run) -> logits `[B, V]` (a view of a static buffer,
        valid until the next replay of the same bucket)."""
        n = len(chunks)
        bucket = next(b for b in self.buckets if b.size >= n)
        head = self._host_head(chunks, bucket.size)
        bucket.head.copy_(head, non_blocking=True)
        fill_placeholders(bucket.field("ids")[:n], chunks)
        assert bucket.graph is not None and bucket.logits is not None, "capture() first"
        bucket.graph.replay()
        self.replays += 1
        return bucket.logits[:n]

    def _host_head(self, chunks: list[ScheduledChunk], size: int) -> torch.Tensor:
        bs = self.block_size
        pad = size - len(chunks)
        ids = [c.token_ids[0] for c in chunks] + [0] * pad
        positions = [c.start_pos for c in chunks] + [0] * pad
        slots = [c.block_ids[c.start_pos // bs] * 2 * bs + c.start_pos % bs for c in chunks]
        lens = [c.end_pos for c in chunks] + [0] * pad
        index, value = self._table_updates(chunks, size)
        sink = self.max_blocks  # row 0, spare column
        index += [sink] * (size - len(index))
        value += [0] * (size - len(value))
        values = ids + positions + slots + [-1] * pad + lens + index + value
        return torch.tensor(values, dtype=torch.int64, pin_memory=True)

    def _table_updates(self, chunks: list[ScheduledChunk], size: int) -> tuple[list, list]:
        """Block-table entries to scatter in the graph; rewrites the tables itself (outside the
        graph) when the rows changed or too many entries did."""
        bs, width = self.block_size, self.max_blocks + 1
        needed = [-(-c.end_pos // bs) for c in chunks]
        requests = tuple(c.request_id for c in chunks)
        index: list[int] = []
        value: list[int] = []
        if requests == self._row_requests:
            rows = zip(chunks, self._row_blocks, needed, strict=True)
            for row, (c, have, need) in enumerate(rows):
                for col in range(have, need):
                    index.append(row * width + col)
                    value.append(c.block_ids[col])
            if len(index) <= size:
                self._row_blocks = needed
                return index, value
        self._rewrite_tables(chunks, needed)
        self._row_requests, self._row_blocks = requests, needed
        return [], []

    def _rewrite_tables(self, chunks: list[ScheduledChunk], needed: list[int]) -> None:
        width = max(needed)
        flat: list[int] = []
        for c, need in zip(chunks, needed, strict=True):
            flat.extend(c.block_ids[:need])
            flat.extend([0] * (width - need))
        host = torch.tensor(flat, dtype=torch.int64, pin_memory=True).view(len(chunks), width)
        self.tables[: len(chunks), :width].copy_(host, non_blocking=True)

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        """The captured work: table updates, then the model forward and the logits."""
        b = bucket.size
        flat_tables = self.tables.view(-1)
        flat_tables.index_copy_(0, bucket.field("update_index"), bucket.field("update_value"))
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
        """A head that touches nothing: slots -1, lengths 0, table updates into the sink."""
        head = torch.zeros(len(_FIELDS) * size, dtype=torch.int64)
        head[2 * size : 3 * size] = -1
        head[4 * size : 5 * size] = self.max_blocks
        return head.to(device)

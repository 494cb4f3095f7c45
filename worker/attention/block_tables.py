"""Block tables kept on the device between steps, grown by the blocks each step adds.

Rebuilding every sequence's padded table on the host each step costs as much as the contexts
are long (a batch of 256 at 8k tokens is 131k entries per step). Here each request owns a row
of one device tensor `[rows, max_blocks]`; a step sends only the entries that are new since the
request's last step (usually none, one when a sequence crosses into a new block, all of them
the first time a request is seen), and the attention metadata gathers the rows it needs on the
device. The host keeps, per request, its row and how many of its blocks the row holds.

A row is dropped when the scheduler releases its request (finished, aborted, preempted), so
`release()` sees a step's `released_request_ids` before `stage()` sees its chunks. A row also
remembers the list object its blocks came from (the scheduler passes each request's own table,
which it replaces when the request gets other blocks): a chunk with another list rewrites the
row, so a request id reused without a release, or a caller that copies its tables, is still
served correctly (at the old cost).
"""

from __future__ import annotations

import torch

from engine.batch import ScheduledChunk
from worker.attention.packing import IntPacker


class BlockTables:
    def __init__(
        self, block_size: int, max_blocks: int, device: torch.device, rows: int = 64
    ) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks  # columns of every row: the longest sequence's blocks
        self.device = device
        self.tables = torch.zeros(rows, max_blocks, dtype=torch.int64, device=device)
        self._row_of: dict[str, int] = {}
        self._held: list[int] = [0] * rows  # blocks of its request each row holds
        self._source: list[list[int] | None] = [None] * rows  # the table they were copied from
        self._free_rows = list(range(rows - 1, -1, -1))
        self._staged = False

    @property
    def num_rows_used(self) -> int:
        return len(self._row_of)

    def release(self, request_ids: list[str]) -> None:
        """Forget these requests' rows (their blocks changed or they ended)."""
        for request_id in request_ids:
            row = self._row_of.pop(request_id, None)
            if row is not None:
                self._held[row] = 0
                self._source[row] = None
                self._free_rows.append(row)

    def stage(self, packer: IntPacker, chunks: list[ScheduledChunk]) -> list[int]:
        """Add the table entries this step's chunks gained to `packer` (as `table_index` and
        `table_value`); returns each chunk's row. Call `apply()` after the packer's transfer."""
        rows: list[int] = []
        index: list[int] = []
        value: list[int] = []
        width = self.max_blocks
        for chunk in chunks:
            row = self._row_of.get(chunk.request_id)
            if row is None:
                row = self._new_row(chunk.request_id)
            need = -(-chunk.end_pos // self.block_size)
            assert need <= width, f"{chunk.request_id}: more blocks than max_model_len allows"
            if self._source[row] is not chunk.block_ids:
                self._source[row] = chunk.block_ids
                self._held[row] = 0
            held = self._held[row]
            if need > held:
                index.extend(range(row * width + held, row * width + need))
                value.extend(chunk.block_ids[held:need])
                self._held[row] = need
            rows.append(row)
        packer.add("table_index", index)
        packer.add("table_value", value)
        self._staged = bool(index)
        return rows

    def apply(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write the staged entries (views of the packer's device buffer) into the tables."""
        if self._staged:
            self.tables.view(-1).index_copy_(0, tensors["table_index"], tensors["table_value"])
            self._staged = False

    def gather(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """The tables `[len(rows), width]` of these rows (a contiguous copy on the device;
        entries past a sequence's blocks are stale, never read: lengths mask them)."""
        return self.tables[:, :width].index_select(0, rows)

    def _new_row(self, request_id: str) -> int:
        if not self._free_rows:
            self._grow()
        row = self._free_rows.pop()
        self._row_of[request_id] = row
        self._held[row] = 0
        self._source[row] = None
        return row

    def _grow(self) -> None:
        """Double the rows (rare: rows track the running requests plus those just released)."""
        old = self.tables.shape[0]
        bigger = torch.zeros(2 * old, self.max_blocks, dtype=torch.int64, device=self.device)
        bigger[:old].copy_(self.tables)
        self.tables = bigger
        self._held += [0] * old
        self._source += [None] * old
        self._free_rows = list(range(2 * old - 1, old - 1, -1))


def tables_for(
    block_tables: BlockTables | None, chunks: list[ScheduledChunk], block_size: int, device
) -> BlockTables:
    """The runner's persistent tables, or (callers without one: tests, kernel benchmarks)
    throwaway tables just wide enough for this step."""
    if block_tables is not None:
        return block_tables
    widest = max(-(-c.end_pos // block_size) for c in chunks)
    return BlockTables(block_size, max(widest, 1), device, rows=len(chunks))

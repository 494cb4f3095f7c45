"""Batched device copies for the local transfer backend: many (source, destination, length)
pieces in one kernel launch on a stream of the backend's own.

UCX's CUDA IPC transport pays per descriptor, so scattered blocks move at a few GB/s; here each
piece (at most `_PIECE_WORDS` words) is one program of one launch, whatever their number. The
host side of a launch (its piece table, the upload, the launch itself) costs about a tenth of a
millisecond, more than a layer's copy, so writes are gathered: `add` queues a write into the
open batch, and the batch launches when someone first asks whether one of its writes is done
(the cache messager polls once per round, after applying every layer signal of the round) or
when it grows large. Addresses are raw device pointers of memory this process has mapped (its
own, or imported over CUDA IPC); lengths and addresses are multiples of the word.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

_PIECE_WORDS = 2048  # 8-byte words per program: 16 KiB
_MAX_BATCH_PIECES = 1 << 16  # 1 GiB: launch at once past this


@triton.jit
def _copy_pieces_kernel(src_ptr, dst_ptr, len_ptr, WORDS: tl.constexpr):
    i = tl.program_id(0)
    src = tl.load(src_ptr + i).to(tl.pointer_type(tl.int64))
    dst = tl.load(dst_ptr + i).to(tl.pointer_type(tl.int64))
    n = tl.load(len_ptr + i)
    offs = tl.arange(0, WORDS)
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


class Batch:
    """Writes launched together; `done()` launches the batch if nobody has yet."""

    def __init__(self, copier: GpuCopier) -> None:
        self.copier = copier
        self.tables: list[np.ndarray] = []  # [3, pieces] each: source, destination, words
        self.event: torch.cuda.Event | None = None
        self.host: torch.Tensor | None = None  # the pinned table, alive until the upload ran

    @property
    def pieces(self) -> int:
        return sum(t.shape[1] for t in self.tables)

    def done(self) -> bool:
        if self.event is None:
            self.copier.flush()
        assert self.event is not None
        return self.event.query()


class GpuCopier:
    """Copies on a side stream of the device holding the source memory (a destination on
    another GPU of the machine is written over peer access). Not thread-safe: its owner holds
    a lock around every call."""

    def __init__(self, device_index: int) -> None:
        self.device = torch.device("cuda", device_index)
        self.stream = torch.cuda.Stream(self.device)
        self.open = Batch(self)

    def add(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> Batch:
        """Queue copying nbytes[i] bytes from src[i] to dst[i] (device addresses); returns the
        batch that will carry it."""
        if ((src | dst | nbytes) % 8).any():
            raise ValueError("device copies need 8-byte aligned addresses and lengths")
        batch = self.open
        batch.tables.append(_pieces(src, dst, nbytes // 8))
        if batch.pieces >= _MAX_BATCH_PIECES:
            self.flush()
        return batch

    def flush(self) -> None:
        """Launch the open batch (if it holds anything) and open the next."""
        batch, self.open = self.open, Batch(self)
        if not batch.tables:
            batch.event = torch.cuda.Event()
            batch.event.record(self.stream)
            return
        batch.host = torch.from_numpy(np.concatenate(batch.tables, axis=1)).pin_memory()
        batch.event = torch.cuda.Event()
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            table = batch.host.to(self.device, non_blocking=True)
            _copy_pieces_kernel[(table.shape[1],)](table[0], table[1], table[2], WORDS=_PIECE_WORDS)
            batch.event.record(self.stream)

    def warm_up(self, addr: int) -> None:
        """Compile the kernel now, not in a request's transfer: one piece of no words (it
        touches no memory: the owner may be computing into it)."""
        batch = self.open
        batch.tables.append(np.array([[addr], [addr], [0]], dtype=np.int64))
        self.flush()
        assert batch.event is not None
        batch.event.synchronize()

    def synchronize(self) -> None:
        """Launch what is queued and wait until every copy has finished."""
        self.flush()
        self.stream.synchronize()


def _pieces(src: np.ndarray, dst: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Each descriptor cut into pieces of at most `_PIECE_WORDS` words: [3, pieces]."""
    pieces = -(-words // _PIECE_WORDS)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    owner = np.repeat(np.arange(len(words)), pieces)
    offset = (np.arange(int(pieces.sum())) - first) * _PIECE_WORDS  # words into its descriptor
    length = np.minimum(words[owner] - offset, _PIECE_WORDS)
    return np.stack([src[owner] + 8 * offset, dst[owner] + 8 * offset, length])

"""Batched device copies for the local transfer backend: many (source, destination, length)
descriptors in one kernel launch on a stream of the backend's own.

UCX's CUDA IPC transport pays per descriptor, so scattered blocks move at a few GB/s; here every
descriptor of a batch is copied by one launch (a long one split over several programs), which on
an H200 moves scattered 64 KiB blocks at ~87% of a plain device copy. The host side of a launch
(the table, its upload, the launch) costs more than a layer's copy, so writes are gathered:
`add` queues a write into the open batch, and the batch launches when someone first asks
whether one of its writes is done (the cache messager polls once per round, after applying
every layer signal of the round) or when it grows large. Addresses are raw device pointers of
memory this process has mapped (its own, or imported over CUDA IPC); lengths and addresses are
multiples of the word.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

_CHUNK_WORDS = 1024  # 8-byte words a program copies per iteration (8 KiB)
_TARGET_PROGRAMS = 2048  # enough to keep every SM busy on one descriptor
_MAX_BATCH_BYTES = 1 << 30  # launch at once past this
# _aligned_rows: the kernel takes the uploaded table's three rows as pointers, and Triton
# compiles a variant per pointer alignment (16 bytes or not). A row of an even number of int64
# words keeps every row 16-byte aligned whatever the batch's descriptor count, so the variant
# compiled at warm-up is the only one (an odd count used to compile another mid-serving).


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, len_ptr, CHUNK: tl.constexpr):
    """Descriptor `program_id(0)`; its chunks split over `num_programs(1)` programs."""
    i = tl.program_id(0)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    src = tl.load(src_ptr + i).to(tl.pointer_type(tl.int64))
    dst = tl.load(dst_ptr + i).to(tl.pointer_type(tl.int64))
    n = tl.load(len_ptr + i)
    for start in range(part * CHUNK, n, parts * CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


class Batch:
    """Writes launched together; `done()` launches the batch if nobody has yet."""

    def __init__(self, copier: GpuCopier) -> None:
        self.copier = copier
        self.tables: list[np.ndarray] = []  # [3, descriptors] each: source, destination, words
        self.event: torch.cuda.Event | None = None
        self.device_table: torch.Tensor | None = None  # uploaded; freed with the batch
        self.nbytes = 0

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
        return self.add_table(np.stack([src, dst, nbytes]), int(nbytes.sum()))

    def add_table(self, table: np.ndarray, nbytes: int) -> Batch:
        """`add` of a [3, N] int64 table (source, destination, bytes) the caller owns and has
        checked for alignment; its last row becomes words in place. `nbytes`: the table's sum."""
        table[2] >>= 3
        batch = self.open
        batch.tables.append(table)
        batch.nbytes += nbytes
        if batch.nbytes >= _MAX_BATCH_BYTES:
            self.flush()
        return batch

    def flush(self) -> None:
        """Launch the open batch (if it holds anything) and open the next."""
        batch, self.open = self.open, Batch(self)
        if not batch.tables:
            batch.event = torch.cuda.Event()
            batch.event.record(self.stream)
            return
        host = np.concatenate(batch.tables, axis=1)
        count, longest = host.shape[1], int(host[2].max())
        if count % 2:  # see _aligned_rows
            host = np.concatenate([host, np.zeros((3, 1), dtype=np.int64)], axis=1)
        parts = max(1, min(-(-_TARGET_PROGRAMS // count), -(-longest // _CHUNK_WORDS)))
        batch.event = torch.cuda.Event()
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            # From pageable memory: the upload is done when `to` returns (a small table).
            table = torch.from_numpy(host).to(self.device)
            _copy_kernel[(count, parts)](table[0], table[1], table[2], CHUNK=_CHUNK_WORDS)
            batch.event.record(self.stream)
        batch.device_table = table  # on the side stream: reused only after what it ordered
        batch.tables = []

    def warm_up(self, addr: int) -> None:
        """Compile the kernel now, not in a request's transfer: one descriptor of no words (it
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

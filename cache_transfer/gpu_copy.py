"""Batched device copies for the local transfer backend: many (source, destination, length)
pieces in one kernel launch on a stream of the backend's own.

UCX's CUDA IPC transport pays per descriptor, so scattered blocks move at a few GB/s; here each
piece (at most `_PIECE_WORDS` words) is one program of one launch, whatever their number, and the
copy runs at the device's copy rate. Addresses are raw device pointers of memory this process has
mapped (its own, or imported over CUDA IPC); lengths and addresses are multiples of the word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

_PIECE_WORDS = 2048  # 8-byte words per program: 16 KiB


@triton.jit
def _copy_pieces_kernel(src_ptr, dst_ptr, len_ptr, WORDS: tl.constexpr):
    i = tl.program_id(0)
    src = tl.load(src_ptr + i).to(tl.pointer_type(tl.int64))
    dst = tl.load(dst_ptr + i).to(tl.pointer_type(tl.int64))
    n = tl.load(len_ptr + i)
    offs = tl.arange(0, WORDS)
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@dataclass
class DeviceCopy:
    """One launched batch; the pinned table it was uploaded from lives as long as it does."""

    event: torch.cuda.Event
    table: torch.Tensor

    def done(self) -> bool:
        return self.event.query()


class GpuCopier:
    """Copies on a side stream of the device holding the source memory; one event per batch
    (a destination on another GPU of the machine is written over peer access)."""

    def __init__(self, device_index: int) -> None:
        self.device = torch.device("cuda", device_index)
        self.stream = torch.cuda.Stream(self.device)

    def copy(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> DeviceCopy:
        """Start copying nbytes[i] bytes from src[i] to dst[i] (device addresses)."""
        if ((src | dst | nbytes) % 8).any():
            raise ValueError("device copies need 8-byte aligned addresses and lengths")
        words = nbytes // 8
        pieces = -(-words // _PIECE_WORDS)
        starts = np.repeat(np.cumsum(pieces) - pieces, pieces)
        index = np.arange(int(pieces.sum())) - starts  # piece number within its descriptor
        owner = np.repeat(np.arange(len(words)), pieces)
        offset = index * _PIECE_WORDS
        table = np.stack(
            [
                src[owner] + 8 * offset,
                dst[owner] + 8 * offset,
                np.minimum(words[owner] - offset, _PIECE_WORDS),
            ]
        )
        host = torch.from_numpy(table).pin_memory()
        event = torch.cuda.Event()
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            device_table = host.to(self.device, non_blocking=True)
            _copy_pieces_kernel[(table.shape[1],)](
                device_table[0], device_table[1], device_table[2], WORDS=_PIECE_WORDS
            )
            event.record(self.stream)
        return DeviceCopy(event, host)

    def warm_up(self, addr: int) -> None:
        """Compile the kernel now, not in a request's transfer: one empty piece at `addr`."""
        zero = np.zeros(1, dtype=np.int64)
        self.copy(zero + addr, zero + addr, zero).event.synchronize()

    def synchronize(self) -> None:
        self.stream.synchronize()

"""Tensor parallelism: which slice of the model a rank holds, and the collectives between ranks.

Megatron-style: q/k/v and gate/up are split by output rows (column-parallel: each rank computes
its own heads and its own slice of the MLP), o_proj and down by input columns (row-parallel: each
rank's partial sum, then one all-reduce). The embedding and the LM head are split by vocabulary
rows: a lookup is zero outside a rank's rows (one all-reduce), logits are gathered. KV heads are
split like query heads; when there are fewer KV heads than ranks, each KV head is replicated on
the ranks whose query heads read it. Every rank then holds the KV of its own heads only.

`ShardLayout` is plain arithmetic (no process group), shared by the loader, the random weights
and the KV-transfer side. `TPGroup` wraps one torch.distributed process group: gloo on CPU, NCCL
on GPU, with a timeout so a collective that does not complete raises instead of hanging.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from worker.model_config import ModelArchConfig, ModelLoadError


@dataclass(frozen=True)
class ShardLayout:
    """What rank `rank` of `size` holds, in global indices (heads, rows)."""

    rank: int
    size: int
    heads: int  # query heads on this rank
    head_start: int  # global index of its first query head
    kv_heads: int  # KV heads on this rank
    kv_head_start: int  # global index of its first KV head
    intermediate: int  # MLP columns on this rank
    intermediate_start: int
    vocab_rows: int  # rows of its embedding / LM-head shard (the last rank's may be padding)
    vocab_start: int

    @property
    def vocab_end(self) -> int:
        return self.vocab_start + self.vocab_rows

    def q_rows(self, head_dim: int) -> slice:
        """This rank's rows of q_proj (and columns of o_proj)."""
        return slice(self.head_start * head_dim, (self.head_start + self.heads) * head_dim)

    def kv_rows(self, head_dim: int) -> slice:
        """This rank's rows of k_proj and of v_proj."""
        start = self.kv_head_start * head_dim
        return slice(start, start + self.kv_heads * head_dim)

    def inter_rows(self) -> slice:
        """This rank's rows of gate_proj and up_proj (and columns of down_proj)."""
        return slice(self.intermediate_start, self.intermediate_start + self.intermediate)

    def shard_qkv(self, fused: torch.Tensor, config: ModelArchConfig) -> torch.Tensor:
        """Whole fused q/k/v rows `[q + 2 kv, ...]` -> this rank's `[q_r + 2 kv_r, ...]`."""
        hd, q, kv = config.head_dim, config.q_size, config.kv_size
        k_part, v_part = fused[q : q + kv], fused[q + kv :]
        rows = self.kv_rows(hd)
        return torch.cat([fused[self.q_rows(hd)], k_part[rows], v_part[rows]])

    def shard_gate_up(self, fused: torch.Tensor) -> torch.Tensor:
        """Whole fused gate/up rows `[2 I, ...]` -> this rank's `[2 I_r, ...]`."""
        gate, up = fused.chunk(2)
        return torch.cat([gate[self.inter_rows()], up[self.inter_rows()]])

    def shard_vocab(self, table: torch.Tensor) -> torch.Tensor:
        """Whole `[V, H]` table -> this rank's `[Vr, H]` rows, zero-padded past V."""
        rows = table[self.vocab_start : self.vocab_end]
        return pad_rows(rows, self.vocab_rows)


def pad_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`rows` `[n, H]` extended by zero rows to `[count, H]` (n <= count)."""
    if rows.shape[0] == count:
        return rows
    padding = rows.new_zeros(count - rows.shape[0], *rows.shape[1:])
    return torch.cat([rows, padding])


def shard_layout(config: ModelArchConfig, rank: int, size: int) -> ShardLayout:
    """The slice of `config`'s model that rank `rank` of `size` holds; ModelLoadError (naming
    tensor_parallel_size) when the model cannot be split that way."""
    check_divisible(config, size)
    assert 0 <= rank < size, (rank, size)
    heads = config.num_heads // size
    kv_total = config.num_kv_heads
    if kv_total >= size:
        kv_heads, kv_start = kv_total // size, rank * (kv_total // size)
    else:  # replicated: ranks r*size/kv .. (r+1)*size/kv - 1 share KV head r
        kv_heads, kv_start = 1, rank // (size // kv_total)
    inter = config.intermediate_size // size
    vocab_rows = -(-config.vocab_size // size)  # ceil: the last shard is padded
    return ShardLayout(
        rank=rank,
        size=size,
        heads=heads,
        head_start=rank * heads,
        kv_heads=kv_heads,
        kv_head_start=kv_start,
        intermediate=inter,
        intermediate_start=rank * inter,
        vocab_rows=vocab_rows,
        vocab_start=rank * vocab_rows,
    )


def kv_head_ranges(config: ModelArchConfig, size: int) -> list[tuple[int, int]]:
    """(first global KV head, count) of what each rank of `size` holds: how the cache messager
    pairs ranks of instances of different sizes (cache_transfer/tp_layout.py)."""
    if size == 1:
        return [(0, config.num_kv_heads)]
    return [
        (s.kv_head_start, s.kv_heads) for s in (shard_layout(config, r, size) for r in range(size))
    ]


def check_divisible(config: ModelArchConfig, size: int) -> None:
    kv = config.num_kv_heads
    problems = []
    if config.num_heads % size:
        problems.append(f"its {config.num_heads} attention heads")
    if (kv % size) if kv >= size else (size % kv):
        problems.append(f"its {kv} KV heads (they must divide by it, or divide it)")
    if config.intermediate_size % size:
        problems.append(f"its intermediate size {config.intermediate_size}")
    if problems:
        raise ModelLoadError(
            f"tensor_parallel_size {size} does not split the model: " + "; ".join(problems)
        )


def local_config(config: ModelArchConfig, layout: ShardLayout) -> ModelArchConfig:
    """The config one rank's model code sees: its own heads and MLP slice; vocabulary and hidden
    size stay global (hidden states are whole on every rank, logits are gathered)."""
    return replace(
        config,
        num_heads=layout.heads,
        num_kv_heads=layout.kv_heads,
        intermediate_size=layout.intermediate,
    )


class TPGroup:
    """One rank's view of its instance's process group. Collectives run on the group's backend
    with its timeout: gloo raises after it; NCCL's watchdog aborts the communicator."""

    def __init__(
        self,
        rank: int,
        size: int,
        group: dist.ProcessGroup | None,
        store: dist.Store | None = None,
    ) -> None:
        self.rank = rank
        self.size = size
        self.group = group  # None: torch's default group
        self.store = store  # the rendezvous store must outlive the group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, C]` per rank -> `[N, size * C]`: rank r's columns at r*C .. (r+1)*C - 1."""
        if self.size == 1:
            return x
        x = x.contiguous()
        if self.group is not None:  # gloo: a list of parts
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x, group=self.group)
            return torch.cat(parts, dim=1)  # [N, size * C]
        rows, cols = x.shape  # NCCL: one collective into one buffer
        out = torch.empty(self.size * rows, cols, dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x)  # [size * N, C]: rank r's rows at r*N .. (r+1)*N - 1
        return out.view(self.size, rows, cols).permute(1, 0, 2).reshape(rows, self.size * cols)


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_tp_group(
    rank: int,
    size: int,
    store_address: tuple[str, int],
    device: torch.device,
    timeout_s: float,
    store: dist.Store | None = None,
) -> TPGroup:
    """Join the instance's process group; rank 0 hosts its TCP rendezvous store (made here,
    or passed in as `store` when its port had to be known first).

    gloo: a process group of its own rather than torch's default one, so one process may hold
    several (the tests run drivers of several instances). NCCL: torch's default group (one
    instance per GPU process), the path torch supports for CUDA-graph capture of collectives."""
    timeout = datetime.timedelta(seconds=timeout_s)
    host, port = store_address
    if store is None:
        store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=timeout)
    if default_backend(device) == "gloo":
        group = dist.ProcessGroupGloo(store, rank, size, timeout)
        return TPGroup(rank, size, group, store)
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a tensor-parallel NCCL group")
    if device.index is None:  # NCCL binds the group to one GPU: name it ("cuda" means current)
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(
        "nccl", store=store, rank=rank, world_size=size, timeout=timeout, device_id=device
    )
    return TPGroup(rank, size, None, store)


def leave_tp_group(tp: TPGroup) -> None:
    """Leave the group without waiting for anyone (gloo groups close when collected).

    NCCL's default group is aborted, never destroyed: a graceful destroy finalizes the
    communicator with its peers and waits forever for a rank that has already exited (the
    driver stops its ranks before it leaves) or died. The abort is local, also unblocks a
    collective stuck on a dead peer, and clears the group so a new one can form in-process."""
    if tp.group is None and dist.is_initialized():
        dist.distributed_c10d._abort_process_group()

"""The ranks 1..N-1 of a tensor-parallel instance: a loop that runs the driver's step plans.

Rank 0 is the driver (worker/tp_runner.py), in the instance's own process; every other rank is a
process (a Ray actor in a deployment, a spawned process in tests and `pdserve generate`) that
runs `run_rank`: join the instance's process group, build a ModelRunner over its shard, report
ready, then for each plan the driver pushes run the same step as every other rank. The ranks'
collectives inside the forward line up because every rank runs the same plans in the same order.

A rank never survives a failure: any exception is reported to the driver and ends the process,
which breaks the process group, so the driver's collective fails at once instead of waiting.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq

from worker.distributed import (
    TPGroup,
    init_tp_group,
    leave_tp_group,
    local_config,
    shard_layout,
)
from worker.loader import resolve_dtype
from worker.model_config import load_model_config
from worker.model_runner import ModelRunner
from worker.tp_plan import PLAN_VERSION, decode_plan

log = logging.getLogger(__name__)

STATUS_READY = 1
STATUS_ERROR = 2
# How often an idle rank checks that its driver still exists.
_DRIVER_CHECK_MS = 1000


@dataclass(frozen=True)
class RunnerArgs:
    """The ModelRunner arguments every rank shares (plain data: it crosses process bounds)."""

    model_path: str
    dtype: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    attention_backend: str = "auto"
    prefill_attention: str = "auto"
    seed: int = 0
    cuda_graphs: bool | None = None
    graph_batch_sizes: list[int] | None = None
    max_model_len: int | None = None
    load_format: str = "safetensors"

    def build(self, device: torch.device, tp: TPGroup | None, **local) -> ModelRunner:
        """The runner of one rank; `local` holds what cannot travel (kv_tensors, layer_done)."""
        return ModelRunner(
            Path(self.model_path),
            dtype=self.dtype,
            device=device,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            kv_cache_bytes=self.kv_cache_bytes,
            attention_backend=self.attention_backend,
            prefill_attention=self.prefill_attention,
            seed=self.seed,
            cuda_graphs=self.cuda_graphs,
            graph_batch_sizes=self.graph_batch_sizes,
            max_model_len=self.max_model_len,
            load_format=self.load_format,
            tp=tp,
            **local,
        )


@dataclass(frozen=True)
class RankSpec:
    """Everything one rank process needs, from the driver."""

    rank: int
    size: int
    device: str
    runner: RunnerArgs
    store_address: tuple[str, int]  # the process group's rendezvous (hosted by rank 0)
    plan_address: str  # zmq: where this rank pulls its plans from
    status_address: str  # zmq: where it pushes ready / error
    collective_timeout_s: float
    driver_pid: int
    cpu_threads: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Share the rank's KV cache with another process (a prefill instance's cache messager):
    # `kv_store(layout, dtype, device, name_prefix)` makes the store (cache_transfer's
    # make_shared_kv, passed by reference so worker/ does not import it); its handle() goes to
    # the driver with the rank's ready report.
    kv_store: Callable[..., Any] | None = None
    kv_store_prefix: str = ""


def encode_status(kind: int, rank: int, text: str = "", kv_handle: dict | None = None) -> bytes:
    return msgpack.packb([PLAN_VERSION, kind, rank, text, kv_handle])


def decode_status(frame: bytes) -> tuple[int, int, str, dict | None]:
    """(kind, rank, error text, the rank's shared KV handle or None)."""
    version, kind, rank, text, kv_handle = msgpack.unpackb(frame)
    assert version == PLAN_VERSION, version
    return kind, rank, text, kv_handle


def run_rank(spec: RankSpec) -> None:
    """A rank's whole life: join, load, serve plans until a stop, the driver's exit or an error."""
    os.environ.update(spec.env)
    ctx = zmq.Context()
    status = ctx.socket(zmq.PUSH)
    status.setsockopt(zmq.LINGER, 5000)  # the error report must get out before the exit
    status.connect(spec.status_address)
    plans = ctx.socket(zmq.PULL)
    plans.setsockopt(zmq.LINGER, 0)
    plans.connect(spec.plan_address)
    kv_store = tp = None
    try:
        device = _set_up_process(spec)
        tp = init_tp_group(
            spec.rank, spec.size, spec.store_address, device, spec.collective_timeout_s
        )
        local = {}
        if spec.kv_store is not None:
            kv_store = _make_kv_store(spec, device)
            local["kv_tensors"] = kv_store.layer_tensors()
        runner = spec.runner.build(device, tp, **local)
        handle = kv_store.handle() if kv_store is not None else None
        status.send(encode_status(STATUS_READY, spec.rank, kv_handle=handle))
        _serve(runner, plans, spec.driver_pid)
    except BaseException as e:
        log.exception("tensor-parallel rank %d failed", spec.rank)
        status.send(encode_status(STATUS_ERROR, spec.rank, f"{type(e).__name__}: {e}"))
        raise
    finally:
        if tp is not None:
            leave_tp_group(tp)
        if kv_store is not None:
            kv_store.close()  # the owner's close also unlinks shared memory
        plans.close()
        status.close()
        ctx.term()


def _set_up_process(spec: RankSpec) -> torch.device:
    if spec.cpu_threads:
        torch.set_num_threads(spec.cpu_threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _make_kv_store(spec: RankSpec, device: torch.device):
    """This rank's KV store, sized like its cache (its own KV heads)."""
    from cache_transfer.layout import KVLayout  # pure Python, allowed from worker/

    args = spec.runner
    if args.num_blocks is None:
        raise ValueError("a shared KV cache needs runner num_blocks")
    config = load_model_config(args.model_path)
    dtype = resolve_dtype(args.dtype, config)
    local = local_config(config, shard_layout(config, spec.rank, spec.size))
    layout = KVLayout(
        num_layers=local.num_layers,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        kv_heads=local.num_kv_heads,
        head_dim=local.head_dim,
        itemsize=torch.empty((), dtype=dtype).element_size(),
    )
    prefix = f"{spec.kv_store_prefix}-rank{spec.rank}"
    assert spec.kv_store is not None
    return spec.kv_store(layout, dtype, device, prefix)


def _serve(runner: ModelRunner, plans: zmq.Socket, driver_pid: int) -> None:
    """Run plans in order. Nothing is read back: rank 0 returns the tokens, and every rank
    samples the same ones (same gathered logits, same seeds) for its next step's inputs."""
    while True:
        if not plans.poll(_DRIVER_CHECK_MS):
            if not _process_exists(driver_pid):
                log.warning("driver %d is gone; rank exits", driver_pid)
                return
            continue
        sched = decode_plan(plans.recv())
        if sched is None:
            return
        runner.preprocess_and_execute(sched)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ProcessRank:
    """A rank in a spawned local process (tests, `pdserve generate`; deployments use Ray actors)."""

    def __init__(self, spec: RankSpec) -> None:
        self.rank = spec.rank
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(
            target=run_rank, args=(spec,), daemon=True, name=f"pdserve-tp-rank-{spec.rank}"
        )
        self.process.start()

    def alive(self) -> bool:
        return self.process.is_alive()

    def describe(self) -> str:
        return f"rank {self.rank} (pid {self.process.pid}) exited with code {self.process.exitcode}"

    def stop(self, timeout_s: float) -> None:
        """Wait for the rank to exit after its stop plan; kill it past the deadline."""
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout_s)


def start_process_ranks(specs: list[RankSpec]) -> list[ProcessRank]:
    return [ProcessRank(spec) for spec in specs]

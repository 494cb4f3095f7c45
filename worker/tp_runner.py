"""The driver of a tensor-parallel instance: rank 0, with ModelRunner's step API.

The instance loop keeps calling `preprocess_and_execute` / `postprocess` / `save_output` as on
one rank. Before each step the driver pushes the step's plan (worker/tp_plan.py) to every other
rank (worker/tp_worker.py) -- one message per rank per step, nothing per layer -- then runs the
step on its own shard; the ranks meet only in the forward's collectives. Rank 0's sampled
tokens are the instance's.

Failure is the instance's, never a hang: a rank that raises reports it and exits; a watchdog
thread (which owns the status socket and does the blocking waits) notices a rank that died or
reported an error, and a step that has not completed within the collective timeout, and aborts
the process group (NCCL; gloo raises by itself when a peer goes or its timeout passes). Every
call after that raises TensorParallelError with the first reason; so does a step whose
collective failed.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
import zmq

from engine.batch import ModelRunnerOutput, SchedulerOutput
from engine.config import EngineConfig
from worker.distributed import (
    TPGroup,
    init_tp_group,
    leave_tp_group,
    local_config,
    shard_layout,
)
from worker.model_config import ModelArchConfig
from worker.model_runner import ModelRunner, StepState
from worker.tp_plan import encode_step, encode_stop
from worker.tp_watchdog import RankWatchdog, StepClock, TensorParallelError
from worker.tp_worker import (
    RankSpec,
    RunnerArgs,
    start_process_ranks,
)

log = logging.getLogger(__name__)
_LEAVE_TIMEOUT_S = 10.0

# How long a failed collective waits for the watchdog's reason before raising without it.
_REASON_GRACE_S = 2.0


class RankHandle(Protocol):
    """A started rank process, as the watchdog sees it."""

    def alive(self) -> bool: ...

    def describe(self) -> str: ...

    def stop(self, timeout_s: float) -> None: ...


RankStarter = Callable[[list[RankSpec]], Sequence[RankHandle]]


class TPRunner:
    """Rank 0 of `size`, in this process, driving ranks 1..size-1 started by `start_ranks`."""

    def __init__(
        self,
        args: RunnerArgs,
        size: int,
        device: torch.device,
        start_ranks: RankStarter,
        rank_devices: list[str],
        collective_timeout_s: float = 120.0,
        startup_timeout_s: float = 600.0,
        cpu_threads: int | None = None,
        kv_store: Callable[..., Any] | None = None,
        kv_store_prefix: str = "",
        exit_on_failure: bool = False,
        **local,
    ) -> None:
        """`rank_devices[r]` is rank r's device as that rank's process names it (Ray gives each
        actor its own GPU as cuda:0); `local` goes to rank 0's ModelRunner (kv_tensors, ...).
        With `kv_store` ranks 1.. keep their KV caches in stores it makes (shared with a cache
        messager; see RankSpec) and `rank_kv_handles[r]` is rank r's handle."""
        assert size > 1 and len(rank_devices) == size
        self.size = size
        self.collective_timeout_s = collective_timeout_s
        self._ctx = zmq.Context()
        self._plans, plan_addresses = self._bind_plan_sockets(size - 1)
        status = self._ctx.socket(zmq.PULL)
        status_address = _bind_local(status)
        store = dist.TCPStore(
            "127.0.0.1",
            0,
            size,
            is_master=True,
            wait_for_workers=False,
            timeout=_seconds(startup_timeout_s),
        )
        specs = [
            RankSpec(
                rank=r,
                size=size,
                device=rank_devices[r],
                runner=args,
                store_address=("127.0.0.1", store.port),
                plan_address=plan_addresses[r - 1],
                status_address=status_address,
                collective_timeout_s=collective_timeout_s,
                driver_pid=os.getpid(),
                cpu_threads=cpu_threads,
                kv_store=kv_store,
                kv_store_prefix=kv_store_prefix,
            )
            for r in range(1, size)
        ]
        self._clock = StepClock()
        self.ranks: list[RankHandle] = []
        self.tp: TPGroup | None = None
        self._watchdog = RankWatchdog(
            status, self.ranks, self._clock, collective_timeout_s, exit_on_failure
        )
        self._watchdog.start()
        self._closed = False
        atexit.register(self.shutdown)  # before multiprocessing's exit handler kills the ranks
        try:
            self.ranks.extend(start_ranks(specs))
            self.tp = self._join(store, device)
            self._watchdog.abort = lambda: leave_tp_group(self.tp)
            self.local: ModelRunner = self._guard(args.build, device, self.tp, **local)
            handles = self._watchdog.wait_ready(size - 1, startup_timeout_s)
            # Ranks 1.. made their KV stores with `kv_store`; rank 0's caller passes its own.
            self.rank_kv_handles: list[dict | None] = [None]
            self.rank_kv_handles += [handles.get(r) for r in range(1, size)]
        except BaseException:
            self.shutdown(timeout_s=5.0)
            raise

    # ModelRunner's step API --------------------------------------------------------------

    def preprocess_and_execute(self, sched: SchedulerOutput) -> StepState:
        self.raise_if_failed()
        if not sched.is_empty:
            self._guard(self._send_plan, encode_step(sched))
            self._clock.begin()
        return self._guard(self.local.preprocess_and_execute, sched)

    def _send_plan(self, frame: bytes) -> None:
        for rank, socket in enumerate(self._plans, start=1):
            try:  # a PUSH to a rank that is gone would block: never wait here
                socket.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                raise TensorParallelError(f"rank {rank} does not take its plan") from None

    def postprocess(self, state: StepState) -> None:
        self._guard(self.local.postprocess, state)

    def save_output(self, state: StepState) -> ModelRunnerOutput:
        output = self._guard(self.local.save_output, state)
        self._clock.end()
        return output

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        state = self.preprocess_and_execute(sched)
        self.postprocess(state)
        if sched.is_empty:
            return self.local.save_output(state)
        return self.save_output(state)

    # What the engine reads of a runner -----------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def kv_cache(self):
        return self.local.kv_cache

    @property
    def config(self):
        return self.local.config

    @property
    def block_size(self) -> int:
        return self.local.block_size

    @property
    def num_blocks(self) -> int:
        return self.local.num_blocks

    @property
    def step_events(self):
        return self.local.step_events

    @step_events.setter
    def step_events(self, value) -> None:
        self.local.step_events = value

    # Failure and shutdown -------------------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why the group failed (the first reason), or None while it is healthy."""
        return self._watchdog.failure

    def raise_if_failed(self) -> None:
        if self._watchdog.failure is not None:
            raise TensorParallelError(f"tensor-parallel instance failed: {self._watchdog.failure}")

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every rank (a stop plan, then a kill past the deadline) and leave the group."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self._watchdog.stopping = True
        for socket in self._plans:
            # A rank that never connected or is gone cannot take it; stop() kills it.
            with contextlib.suppress(zmq.Again):
                socket.send(encode_stop(), zmq.NOBLOCK)
        for rank in self.ranks:
            rank.stop(timeout_s)
        watchdog_done = self._watchdog.stop()
        for socket in self._plans:
            socket.close(linger=0)
        if self.tp is not None:
            self._leave_group(min(timeout_s, _LEAVE_TIMEOUT_S))
        if watchdog_done:  # term() would wait for the watchdog's socket
            self._ctx.term()

    def _leave_group(self, timeout_s: float) -> None:
        """Leave the group, but never hang a shutdown on it: on two H200s, aborting the second
        NCCL group one process had made (only tests make two) was seen to block for good."""
        leave = threading.Thread(target=leave_tp_group, args=(self.tp,), daemon=True)
        leave.start()
        leave.join(timeout_s)
        if leave.is_alive():
            log.warning("leaving the tensor-parallel group took over %.0f s; going on", timeout_s)

    def _guard(self, call, *args, **kwargs):
        """Run a step phase; any failure fails the whole group (the ranks may be mid-collective,
        so no later step could line up with them)."""
        try:
            return call(*args, **kwargs)
        except Exception as e:
            reason = self._watchdog.wait_failure(_REASON_GRACE_S)
            self._watchdog.fail(reason or f"rank 0: {type(e).__name__}: {e}")
            raise TensorParallelError(
                f"tensor-parallel instance failed: {self._watchdog.failure}"
            ) from e

    def _join(self, store: dist.TCPStore, device: torch.device) -> TPGroup:
        try:
            return init_tp_group(
                0, self.size, ("127.0.0.1", store.port), device, self.collective_timeout_s, store
            )
        except Exception as e:
            reason = self._watchdog.wait_failure(_REASON_GRACE_S)
            raise TensorParallelError(f"tensor-parallel group did not form: {reason or e}") from e

    def _bind_plan_sockets(self, count: int) -> tuple[list[zmq.Socket], list[str]]:
        sockets, addresses = [], []
        for _ in range(count):
            socket = self._ctx.socket(zmq.PUSH)
            addresses.append(_bind_local(socket))
            sockets.append(socket)
        return sockets, addresses


class LocalRanks:
    """Ranks as spawned processes of this host, GPU r for rank r (`pdserve generate`, tests).
    A failure raises TensorParallelError in the caller."""

    exit_on_failure = False

    def __call__(self, specs: list[RankSpec]) -> Sequence[RankHandle]:
        return start_process_ranks(specs)

    def devices(self, device: torch.device, size: int) -> list[str]:
        """Each rank's device: GPU r for rank r."""
        if device.type != "cuda":
            return [device.type] * size
        first = device.index or 0
        return [f"cuda:{first + r}" for r in range(size)]


class RankLauncher(Protocol):
    """Starts ranks 1..N-1 and names each rank's device as its own process sees it.
    `exit_on_failure`: the instance process exits when the group fails (its deployment
    restarts it) instead of raising in the caller."""

    exit_on_failure: bool

    def __call__(self, specs: list[RankSpec]) -> Sequence[RankHandle]: ...

    def devices(self, device: torch.device, size: int) -> list[str]: ...


def make_runner(
    args: RunnerArgs,
    device: torch.device,
    engine: EngineConfig,
    ranks: RankLauncher | None = None,
    **local,
) -> ModelRunner | TPRunner:
    """The instance's runner: a ModelRunner, or at tensor_parallel_size > 1 the driver of that
    many ranks, started by `ranks` (default: LocalRanks)."""
    size = engine.tensor_parallel_size
    if size == 1:
        return args.build(device, None, **local)
    ranks = ranks or LocalRanks()
    return TPRunner(
        args,
        size,
        device,
        ranks,
        ranks.devices(device, size),
        collective_timeout_s=engine.tensor_parallel_timeout_s,
        exit_on_failure=ranks.exit_on_failure,
        **local,
    )


def rank_config(config: ModelArchConfig, size: int) -> ModelArchConfig:
    """What one rank of `size` holds of `config` (all ranks hold the same amount)."""
    return local_config(config, shard_layout(config, 0, size)) if size > 1 else config


def _bind_local(socket: zmq.Socket) -> str:
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    return f"tcp://127.0.0.1:{port}"


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)

"""One instance's engine: scheduler (engine/) + model runner (worker/) in a short step loop.

Sequential mode runs each step's three phases in order. Overlap mode (execute N, save N-1,
postprocess N; see worker/model_runner.py) schedules and launches step N before step N-1's
tokens are read back, so the host's scheduling and bookkeeping run while the device computes.
Both give the same tokens; overlap is on by default for decode instances on GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cache_transfer.layout import KVLayout
from engine.batch import ModelRunnerOutput, SchedulerOutput
from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig, Role
from engine.outputs import TokenDelta
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from worker.attention.triton_metadata import FLASH_MIN_TOKENS, flash_plan_lengths
from worker.cuda_graphs import default_batch_sizes
from worker.default_model import ensure_default_model
from worker.distributed import kv_head_ranges
from worker.kv_cache import num_blocks_for_budget
from worker.model_config import load_model_config
from worker.model_runner import StepState
from worker.tp_runner import RankLauncher, make_runner, rank_config
from worker.tp_worker import RunnerArgs
from worker.warmup import warm_up


def resolve_model_path(model: ModelConfig) -> Path:
    """The model folder to load: the configured one, or the converted default model."""
    if model.path:
        return Path(model.path).expanduser()
    cache_dir = Path(model.cache_dir).expanduser() if model.cache_dir else None
    return ensure_default_model(cache_dir)


def resolve_device(model: ModelConfig) -> torch.device:
    if model.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(model.device)


def resolve_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    if model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, model.dtype)


def resolve_overlap(setting: bool | None, model: ModelConfig) -> bool:
    """The overlap schedule's switch: as configured, else on for CUDA (on CPU it only costs)."""
    if setting is not None:
        return setting
    return resolve_device(model).type == "cuda"


def kv_layout_for(model: ModelConfig, engine: EngineConfig) -> tuple[KVLayout, torch.dtype]:
    """The KV cache geometry an instance with this config allocates (before loading weights)."""
    # under tensor parallelism: what each rank holds (its KV heads)
    arch = rank_config(load_model_config(resolve_model_path(model)), engine.tensor_parallel_size)
    dtype = resolve_dtype(model, resolve_device(model))
    block_size = engine.scheduler.block_size
    num_blocks = engine.cache.num_blocks or num_blocks_for_budget(
        arch, block_size, dtype, engine.cache.memory_mb * 2**20
    )
    layout = KVLayout(
        num_layers=arch.num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        itemsize=torch.empty((), dtype=dtype).element_size(),
    )
    return layout, dtype


class EngineCore:
    """Schedules and runs one step at a time. Not thread-safe: one loop owns and drives it."""

    def __init__(
        self,
        model: ModelConfig,
        engine: EngineConfig,
        role: Role = Role.MIXED,
        kv_tensors: list[torch.Tensor] | None = None,
        layer_done=None,
        overlap: bool = False,
        cuda_graphs: bool | None = None,
        tp_ranks: RankLauncher | None = None,
        rank_kv_store: tuple[Callable[..., Any], str] | None = None,
        defer_warmup: bool = False,
    ) -> None:
        """`overlap`: run steps under the overlap schedule (see the module docstring).
        `cuda_graphs`: None lets the runner decide (on with Triton on CUDA).
        `tp_ranks`: how ranks 1.. start at engine.tensor_parallel_size > 1 (default: local
        processes; deployments pass Ray actors, cluster/tp_ranks.py).
        `rank_kv_store`: (store factory, name prefix) with which ranks 1.. keep their KV caches
        where this process can map them (cache_transfer's make_shared_kv), so that their KV can
        be moved to or from another instance; `rank_kv_handles` then holds their handles.
        `defer_warmup`: the caller runs `warm_up()` itself, on the thread that will step."""
        self.model_path = resolve_model_path(model)
        self.arch = load_model_config(self.model_path)
        device = resolve_device(model)
        dtype = resolve_dtype(model, device)
        sched_cfg = engine.scheduler
        if kv_tensors is not None:
            num_blocks = kv_tensors[0].shape[0]
        else:  # under tensor parallelism each rank's budget holds its own KV heads
            num_blocks = engine.cache.num_blocks or num_blocks_for_budget(
                rank_config(self.arch, engine.tensor_parallel_size),
                sched_cfg.block_size,
                dtype,
                engine.cache.memory_mb * 2**20,
            )
        self.max_model_len = min(
            sched_cfg.max_model_len or self.arch.max_position_embeddings,
            self.arch.max_position_embeddings,
        )
        runner_args = RunnerArgs(
            str(self.model_path),
            dtype=str(dtype).removeprefix("torch."),
            block_size=sched_cfg.block_size,
            num_blocks=num_blocks,
            seed=model.seed,
            cuda_graphs=cuda_graphs,
            graph_batch_sizes=default_batch_sizes(sched_cfg.max_num_seqs),
            max_model_len=self.max_model_len,
            load_format=model.load_format,
            prefill_attention=engine.prefill_attention,
        )
        self.tp_size = engine.tensor_parallel_size
        local: dict[str, Any] = {"kv_tensors": kv_tensors, "layer_done": layer_done}
        if rank_kv_store is not None and self.tp_size > 1:
            local["kv_store"], local["kv_store_prefix"] = rank_kv_store
        self.runner = make_runner(runner_args, device, engine, tp_ranks, **local)
        self.overlap = overlap
        self._in_flight: tuple[SchedulerOutput, StepState] | None = None
        self.block_manager = BlockManager(
            num_blocks, sched_cfg.block_size, sched_cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(sched_cfg, self.block_manager, self.max_model_len, role)
        flash = engine.prefill_attention == "auto" and dtype in (torch.bfloat16, torch.float16)
        lengths = flash_plan_lengths(FLASH_MIN_TOKENS, sched_cfg.max_num_batched_tokens)
        warm = engine.warmup and device.type == "cuda"
        self._warmup: Sequence[int] | None = (lengths if flash else ()) if warm else None
        self.warmup_s = 0.0
        if not defer_warmup:
            self.warm_up()

    def warm_up(self) -> float:
        """Run the start-up warm-up (worker/warmup.py) once, on the calling thread: part of
        what it builds is kept per thread (cuDNN's attention plans), so it must be the thread
        that runs the steps -- an instance's loop thread (`defer_warmup` at construction)."""
        if self._warmup is not None:
            lengths, self._warmup = self._warmup, None
            self.warmup_s = warm_up(self, lengths)
        return self.warmup_s

    @property
    def warmed_up(self) -> bool:
        return self._warmup is None

    @property
    def kv_head_ranges(self) -> list[tuple[int, int]]:
        """(first global KV head, count) that each rank's cache holds."""
        return kv_head_ranges(self.arch, self.tp_size)

    @property
    def rank_kv_handles(self) -> list[dict | None]:
        """Per rank, the handle of its KV store when `rank_kv_store` made one (rank 0: None,
        the caller's own `kv_tensors`)."""
        return getattr(self.runner, "rank_kv_handles", [None])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.arch.eos_token_ids

    def add_request(self, request: Request) -> None:
        if not request.eos_token_ids:
            request.eos_token_ids = self.eos_token_ids
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str, status=RequestStatus.FINISHED_ABORTED) -> bool:
        return self.scheduler.abort_request(request_id, status)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    @property
    def in_flight(self) -> SchedulerOutput | None:
        """The step launched but not yet saved (overlap mode)."""
        return self._in_flight[0] if self._in_flight is not None else None

    def step(self) -> list[TokenDelta]:
        """Schedule and run one step; returns the deltas of the step whose output was saved
        (in overlap mode the previous one)."""
        ready = self.execute_and_save(self.scheduler.schedule())
        return self.scheduler.update_from_output(*ready) if ready is not None else []

    def execute_and_save(
        self, sched: SchedulerOutput
    ) -> tuple[SchedulerOutput, ModelRunnerOutput] | None:
        """Run `sched` (it may be empty) and return the step whose output is ready, for the
        caller to pass to `scheduler.update_from_output`: `sched` itself in sequential mode; in
        overlap mode the step launched before it (None when none was in flight)."""
        if not sched.is_empty:
            self.block_manager.step_launched(sched.step_id)
        elif sched.released_request_ids:  # nothing to run, but the runner drops their state
            self.runner.preprocess_and_execute(sched)
        if not self.overlap and self._in_flight is None:
            if sched.is_empty:
                return None
            result = self.runner.execute_model(sched)
            self.block_manager.step_done(sched.step_id)
            return sched, result
        state = None if sched.is_empty else self.runner.preprocess_and_execute(sched)
        ready = None
        if self._in_flight is not None:  # kept until saved: a failure can still end its requests
            prev_sched, prev_state = self._in_flight
            ready = prev_sched, self.runner.save_output(prev_state)
            self.block_manager.step_done(prev_sched.step_id)
        self._in_flight = None
        if state is not None:
            self.runner.postprocess(state)
            self._in_flight = sched, state
        return ready

    def drop_in_flight(self) -> SchedulerOutput | None:
        """Forget the step in flight (after a failure); returns it so its requests can fail."""
        sched = self.in_flight
        self._in_flight = None
        if sched is not None:
            if self.runner.device.type == "cuda":
                torch.cuda.synchronize(self.runner.device)  # its writes end before blocks move
            self.block_manager.step_done(sched.step_id)
        return sched

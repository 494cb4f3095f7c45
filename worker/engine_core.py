"""One instance's engine: scheduler (engine/) + model runner (worker/) in a short step loop."""

from __future__ import annotations

from pathlib import Path

import torch

from cache_transfer.layout import KVLayout
from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig, Role
from engine.outputs import TokenDelta
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from worker.default_model import ensure_default_model
from worker.kv_cache import num_blocks_for_budget
from worker.model_config import load_model_config
from worker.model_runner import ModelRunner


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


def kv_layout_for(model: ModelConfig, engine: EngineConfig) -> tuple[KVLayout, torch.dtype]:
    """The KV cache geometry an instance with this config allocates (before loading weights)."""
    arch = load_model_config(resolve_model_path(model))
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
    """Schedules and runs one step at a time. Not thread-safe: one owner drives it."""

    def __init__(
        self,
        model: ModelConfig,
        engine: EngineConfig,
        role: Role = Role.MIXED,
        kv_tensors: list[torch.Tensor] | None = None,
        layer_done=None,
    ) -> None:
        self.model_path = resolve_model_path(model)
        self.arch = load_model_config(self.model_path)
        device = resolve_device(model)
        dtype = resolve_dtype(model, device)
        sched_cfg = engine.scheduler
        if kv_tensors is not None:
            num_blocks = kv_tensors[0].shape[0]
        else:
            num_blocks = engine.cache.num_blocks or num_blocks_for_budget(
                self.arch, sched_cfg.block_size, dtype, engine.cache.memory_mb * 2**20
            )
        self.runner = ModelRunner(
            self.model_path,
            dtype=dtype,
            device=device,
            block_size=sched_cfg.block_size,
            num_blocks=num_blocks,
            seed=model.seed,
            kv_tensors=kv_tensors,
            layer_done=layer_done,
        )
        self.max_model_len = min(
            sched_cfg.max_model_len or self.arch.max_position_embeddings,
            self.arch.max_position_embeddings,
        )
        self.block_manager = BlockManager(
            num_blocks, sched_cfg.block_size, sched_cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(sched_cfg, self.block_manager, self.max_model_len, role)

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
        return self.scheduler.has_work()

    def step(self) -> list[TokenDelta]:
        """Schedule, execute (three phases, in order) and account one step."""
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            return []
        result = self.runner.execute_model(sched_out)
        return self.scheduler.update_from_output(sched_out, result)

"""The model runner: model + paged KV cache + attention backend + sampler, one step at a time.

A step has three phases so that the overlap schedule (execute N, save N-1, postprocess N) fits:
- `preprocess_and_execute(sched)`: build the step's tensors, run forward and sampling; on CUDA
  nothing waits for the device.
- `postprocess(state)`: enqueue the copy of the sampled ids into a pinned host buffer and record
  an event.
- `save_output(state)`: wait for that event and return the tokens.
Sequential mode is `execute_model`. The runner keeps no per-request state (seeded sampling is
derived from the chunk itself), so `SchedulerOutput.released_request_ids` needs no action here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.batch import ModelRunnerOutput, SchedulerOutput
from worker.attention import make_attention_backend, prepare_step_inputs
from worker.kv_cache import KVCache, make_kv_cache_spec, num_blocks_for_budget
from worker.loader import load_model, resolve_dtype
from worker.model_config import ModelArchConfig, load_model_config
from worker.sampler import Sampler, SamplingRow

# Steps whose sampled ids can be in flight at once (the overlap schedule holds two).
_HOST_BUFFER_RING = 3


@dataclass
class StepState:
    """What one step left on the device, until its output is saved."""

    step_id: int
    request_ids: list[str]
    sample_chunks: list[int]  # chunk index of each sampled row
    sampled: torch.Tensor | None  # [N] int64 on the device; None when nothing sampled
    host: torch.Tensor | None = None  # [>= N] host copy of `sampled` (pinned on CUDA)
    event: torch.cuda.Event | None = None


class ModelRunner:
    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        kv_tensors: list[torch.Tensor] | None = None,
        layer_done: Callable[[int], None] | None = None,
        attention_backend: str = "torch",
        seed: int = 0,
    ) -> None:
        """Give the KV size as `num_blocks`, as a byte budget `kv_cache_bytes`, or implicitly by
        passing pre-made `kv_tensors` (one `[num_blocks, 2, block_size, kvh, hd]` per layer)."""
        self.device = torch.device(device)
        self.config: ModelArchConfig = load_model_config(model_path)
        self.dtype = resolve_dtype(dtype, self.config)
        cfg = self.config
        attention = make_attention_backend(
            attention_backend, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        )
        self.model = load_model(model_path, self.dtype, self.device, attention)
        self.kv_cache = self._make_kv_cache(block_size, num_blocks, kv_cache_bytes, kv_tensors)
        self.sampler = Sampler(self.device, seed)
        self.layer_done = layer_done
        self._host_buffers: list[torch.Tensor] = []
        self._step_count = 0

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @torch.inference_mode()
    def preprocess_and_execute(self, sched: SchedulerOutput) -> StepState:
        request_ids = [c.request_id for c in sched.chunks]
        if sched.is_empty:
            return StepState(sched.step_id, request_ids, [], None)
        inputs = prepare_step_inputs(
            sched.chunks, self.block_size, self.device, self.config.sliding_window
        )
        hidden = self.model.forward(
            inputs.input_ids, inputs.positions, inputs.attn, self.kv_cache.layers, self.layer_done
        )  # [T, H]
        if not inputs.sample_chunks:
            return StepState(sched.step_id, request_ids, [], None)
        if inputs.logits_index is not None:
            hidden = hidden.index_select(0, inputs.logits_index)  # [N, H]
        logits = self.model.compute_logits(hidden)  # [N, V]
        rows = [
            SamplingRow(sched.chunks[i].sampling_params, sched.chunks[i].num_generated)
            for i in inputs.sample_chunks
        ]
        sampled = self.sampler(logits, rows)  # [N]
        return StepState(sched.step_id, request_ids, inputs.sample_chunks, sampled)

    def postprocess(self, state: StepState) -> None:
        if state.sampled is None:
            return
        if self.device.type != "cuda":
            state.host = state.sampled
            return
        host = self._host_buffer(state.sampled.shape[0])
        host[: state.sampled.shape[0]].copy_(state.sampled, non_blocking=True)
        state.host = host
        state.event = torch.cuda.Event()
        state.event.record()

    def save_output(self, state: StepState) -> ModelRunnerOutput:
        tokens: list[int | None] = [None] * len(state.request_ids)
        if state.sampled is not None:
            assert state.host is not None, "postprocess() must run before save_output()"
            if state.event is not None:
                state.event.synchronize()
            values = state.host[: len(state.sample_chunks)].tolist()
            for chunk_index, token in zip(state.sample_chunks, values, strict=True):
                tokens[chunk_index] = token
        return ModelRunnerOutput(state.step_id, state.request_ids, tokens)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        state = self.preprocess_and_execute(sched)
        self.postprocess(state)
        return self.save_output(state)

    def _make_kv_cache(
        self,
        block_size: int,
        num_blocks: int | None,
        kv_cache_bytes: int | None,
        kv_tensors: list[torch.Tensor] | None,
    ) -> KVCache:
        if num_blocks is None and kv_tensors is not None:
            num_blocks = kv_tensors[0].shape[0]
        if num_blocks is None:
            if kv_cache_bytes is None:
                raise ValueError("give num_blocks, kv_cache_bytes or kv_tensors")
            num_blocks = num_blocks_for_budget(self.config, block_size, self.dtype, kv_cache_bytes)
        spec = make_kv_cache_spec(self.config, num_blocks, block_size, self.dtype)
        if kv_tensors is not None:
            return KVCache.from_tensors(spec, kv_tensors)
        return KVCache.allocate(spec, self.device)

    def _host_buffer(self, size: int) -> torch.Tensor:
        """A pinned buffer from a small ring; an in-flight step keeps its own reference."""
        slot = self._step_count % _HOST_BUFFER_RING
        self._step_count += 1
        if len(self._host_buffers) <= slot:
            self._host_buffers.append(torch.empty(0, dtype=torch.int64))
        if self._host_buffers[slot].numel() < size:
            capacity = max(size, 256)
            self._host_buffers[slot] = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        return self._host_buffers[slot]

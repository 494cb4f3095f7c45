"""The model runner: model + paged KV cache + attention backend + sampler, one step at a time.

A step has three phases so that the overlap schedule (execute N, save N-1, postprocess N) fits:
- `preprocess_and_execute(sched)`: build the step's tensors, run forward and sampling; on CUDA
  nothing waits for the device.
- `postprocess(state)`: enqueue the copy of the sampled ids into a pinned host buffer and record
  an event.
- `save_output(state)`: wait for that event and return the tokens.
Sequential mode is `execute_model`. In overlap mode a decode chunk's token may be
PLACEHOLDER_TOKEN: the token its request sampled in the previous step, which the runner copies on
the device from that step's sampled ids (no host round trip). The runner keeps no per-request
state but what saves host work per step: block tables on the device (grown by the blocks each
step adds, worker/attention/block_tables.py) and penalty counts (worker/sampler.py); a request in
`released_request_ids` loses both (seeded sampling is derived from the chunk itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.batch import PLACEHOLDER_TOKEN, ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from worker.attention import make_attention_backend, prepare_inputs_for
from worker.attention.block_tables import BlockTables
from worker.cuda_graphs import DecodeGraphs, default_batch_sizes
from worker.distributed import TPGroup, local_config, shard_layout
from worker.kv_cache import KVCache, make_kv_cache_spec, num_blocks_for_budget
from worker.loader import load_model, resolve_dtype
from worker.model_config import ModelArchConfig, load_model_config
from worker.sampler import LogprobsTensors, Sampler, SamplingRow

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
    # Rows that asked for logprobs; on the device, then on the host after postprocess().
    logprobs: LogprobsTensors | None = None


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
        attention_backend: str = "auto",
        prefill_attention: str = "auto",
        seed: int = 0,
        cuda_graphs: bool | None = None,
        graph_batch_sizes: list[int] | None = None,
        max_model_len: int | None = None,
        load_format: str = "safetensors",
        tp: TPGroup | None = None,
    ) -> None:
        """Give the KV size as `num_blocks`, as a byte budget `kv_cache_bytes`, or implicitly by
        passing pre-made `kv_tensors` (one `[num_blocks, 2, block_size, kvh, hd]` per layer).

        `prefill_attention` (auto, paged): see engine.config.EngineConfig.prefill_attention.
        `cuda_graphs` (None: on when the Triton backend runs on CUDA and no `layer_done` hook is
        set) captures decode graphs for `graph_batch_sizes` (default 1..64) with contexts up to
        `max_model_len` (default: the model's). Under tensor parallelism (`tp`) the runner holds
        its rank's shard and `config` is the rank's local one (its heads; worker/distributed.py)."""
        self.device = torch.device(device)
        self.tp = tp
        self.config: ModelArchConfig = load_model_config(model_path)
        if tp is not None:
            self.config = local_config(self.config, shard_layout(self.config, tp.rank, tp.size))
        self.dtype = resolve_dtype(dtype, self.config)
        cfg = self.config
        self.attention = make_attention_backend(
            attention_backend,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.device,
            prefill_attention,
            self.dtype,
        )
        self._prepare_inputs = prepare_inputs_for(self.attention)
        self.model = load_model(
            model_path, self.dtype, self.device, self.attention, load_format, tp
        )
        self.kv_cache = self._make_kv_cache(block_size, num_blocks, kv_cache_bytes, kv_tensors)
        max_len = max_model_len or cfg.max_position_embeddings
        self.block_tables = BlockTables(block_size, -(-max_len // block_size), self.device)
        self.sampler = Sampler(self.device, seed)
        self.layer_done = layer_done
        self._host_buffers: list[torch.Tensor] = []
        self._step_count = 0
        # The last executed step: its sampled ids feed the next step's placeholders.
        self._last_state: StepState | None = None
        # Set to a list to record (start, end) CUDA events around each step (benchmarks).
        self.step_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None
        self._step_start: torch.cuda.Event | None = None
        self.graphs = self._make_graphs(cuda_graphs, graph_batch_sizes, max_model_len)

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @torch.inference_mode()
    def preprocess_and_execute(self, sched: SchedulerOutput) -> StepState:
        request_ids = [c.request_id for c in sched.chunks]
        # Released requests lose their block tables and penalty counts, before this step's
        # chunks are seen (a preempted request may come back in this very step).
        self.block_tables.release(sched.released_request_ids)
        self.sampler.release(sched.released_request_ids)
        if sched.is_empty:
            return StepState(sched.step_id, request_ids, [], None)
        if self.step_events is not None and self.device.type == "cuda":
            self._step_start = torch.cuda.Event(enable_timing=True)
            self._step_start.record()
        logits, sample_chunks = self._forward(sched)
        if logits is None:
            self._last_state = StepState(sched.step_id, request_ids, [], None)
            return self._last_state
        rows = [
            SamplingRow(c.sampling_params, c.num_generated, c.output_token_ids, c.request_id)
            for c in (sched.chunks[i] for i in sample_chunks)
        ]
        sampled = self.sampler(logits, rows)  # [N]
        logprobs = self.sampler.logprobs(logits, sampled, rows)  # None unless a row asked
        self._last_state = StepState(
            sched.step_id, request_ids, sample_chunks, sampled, logprobs=logprobs
        )
        return self._last_state

    def _forward(self, sched: SchedulerOutput) -> tuple[torch.Tensor | None, list[int]]:
        """Logits `[N, V]` of the rows that sample (None when none does) and their chunks."""
        chunks = sched.chunks
        if self.graphs is not None and self.graphs.can_run(chunks):
            logits = self.graphs.run(chunks, self._fill_placeholders, self.block_tables)
            return logits, list(range(len(chunks)))
        inputs = self._prepare_inputs(
            chunks, self.block_size, self.device, self.config.sliding_window, self.block_tables
        )
        self._fill_placeholders(inputs.input_ids, chunks)
        hidden = self.model.forward(
            inputs.input_ids, inputs.positions, inputs.attn, self.kv_cache.layers, self.layer_done
        )  # [T, H]
        if not inputs.sample_chunks:
            return None, []
        if inputs.logits_index is not None:
            hidden = hidden.index_select(0, inputs.logits_index)  # [N, H]
        return self.model.compute_logits(hidden), inputs.sample_chunks  # [N, V]

    def _fill_placeholders(self, input_ids: torch.Tensor, chunks: list[ScheduledChunk]) -> None:
        """Replace each PLACEHOLDER_TOKEN in `input_ids` `[T]` (the chunks' tokens, in order) by
        the token its request sampled in the last step, on the device. The scheduler only ever
        puts a placeholder last in a chunk (the token sampled by the step in flight)."""
        dst: list[int] = []
        src: list[int] = []
        row = 0
        prev_rows: dict[str, int] | None = None
        for chunk in chunks:
            row += chunk.num_tokens
            if chunk.token_ids[-1] != PLACEHOLDER_TOKEN:
                continue
            if prev_rows is None:
                prev_rows = self._last_sampled_rows()
            dst.append(row - 1)
            src.append(prev_rows[chunk.request_id])
        if not dst:
            return
        assert self._last_state is not None and self._last_state.sampled is not None
        last = self._last_state.sampled  # [N_prev]
        n = len(dst)
        if dst == src and dst[-1] == n - 1:  # the same decode batch as last step: one copy
            input_ids[:n].copy_(last[:n])
            return
        index = torch.tensor(dst + src, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        index = index.to(self.device, non_blocking=True)
        input_ids.index_copy_(0, index[:n], last.index_select(0, index[n:]))

    def _last_sampled_rows(self) -> dict[str, int]:
        """Request id -> row of the last step's sampled ids."""
        state = self._last_state
        assert state is not None and state.sampled is not None, "placeholder without a sample"
        return {state.request_ids[c]: i for i, c in enumerate(state.sample_chunks)}

    def postprocess(self, state: StepState) -> None:
        if state.sampled is None:
            return
        if state.logprobs is not None:  # before the event below, which then covers the copies
            state.logprobs = state.logprobs.to_host()
        if self.device.type != "cuda":
            state.host = state.sampled
            return
        host = self._host_buffer(state.sampled.shape[0])
        host[: state.sampled.shape[0]].copy_(state.sampled, non_blocking=True)
        state.host = host
        state.event = torch.cuda.Event()
        state.event.record()
        if self.step_events is not None and self._step_start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.step_events.append((self._step_start, end))
            self._step_start = None

    def save_output(self, state: StepState) -> ModelRunnerOutput:
        tokens: list[int | None] = [None] * len(state.request_ids)
        if state.sampled is not None:
            assert state.host is not None, "postprocess() must run before save_output()"
            if state.event is not None:
                state.event.synchronize()
            values = state.host[: len(state.sample_chunks)].tolist()
            for chunk_index, token in zip(state.sample_chunks, values, strict=True):
                tokens[chunk_index] = token
        logprobs = None
        if state.logprobs is not None:
            logprobs = state.logprobs.per_chunk(state.sample_chunks, len(state.request_ids))
        return ModelRunnerOutput(state.step_id, state.request_ids, tokens, logprobs)

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

    def _make_graphs(
        self, enable: bool | None, batch_sizes: list[int] | None, max_model_len: int | None
    ) -> DecodeGraphs | None:
        triton_on_cuda = self.device.type == "cuda" and self.attention.name == "triton"
        if enable is None:
            enable = triton_on_cuda and self.layer_done is None
        if not enable:
            return None
        if not triton_on_cuda:
            raise ValueError("CUDA graphs need the triton attention backend on a CUDA device")
        graphs = DecodeGraphs(
            self.model,
            self.attention,
            self.kv_cache.layers,
            self.block_size,
            max_model_len or self.config.max_position_embeddings,
            batch_sizes or default_batch_sizes(64),
            self.config.sliding_window,
        )
        graphs.capture()
        return graphs

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

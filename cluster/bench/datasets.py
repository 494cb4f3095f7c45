"""Workloads: what each benchmark request sends.

`random` draws prompt and output lengths uniformly from [len*(1-r), len*(1+r)] (vLLM's
--random-range-ratio). With a tokenizer the prompt is that many random token ids, sent as a
token-id prompt, so the server sees exactly the requested length. Without one it is that many
common English words, each one token in the usual BPE vocabularies (after the BOS, if any), so
the length is close but not exact; the report uses the server's usage counts when it sends them.

`jsonl` reads one object per line: {"prompt": str} or {"messages": [...]}, optional "max_tokens".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cluster.bench import BenchError

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

Endpoint = Literal["completions", "chat"]
DEFAULT_RANDOM_PROMPTS = 100

# Short, frequent words: each is a single token (with its leading space) in GPT-2, Llama and
# Qwen style BPE vocabularies, which is what makes word count a good stand-in for token count.
_WORD_TEXT = (
    "the of and to in is was for on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time "
    "could no make than first been its who now people my made over did down only way find use "
    "may water long little very after words called just where most know get through back much "
    "before go good new write our used me man day too any same right look think also around "
    "another came come work three word must because does part even place well such here take why "
    "things help put years different away again off went old number great tell men say small"
)
_WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload; exactly one of `prompt` and `messages` is set."""

    prompt: str | list[int] | None
    messages: list[dict[str, Any]] | None
    max_tokens: int | None
    prompt_len: int | None = None  # tokens we meant to send, when known


@dataclass(frozen=True)
class DatasetSpec:
    kind: Literal["random", "jsonl"]
    endpoint: Endpoint = "completions"
    num_prompts: int | None = None  # None: DEFAULT_RANDOM_PROMPTS, or every line of the file
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    path: str | None = None
    seed: int = 0


def load_requests(spec: DatasetSpec, tokenizer: Tokenizer | None = None) -> list[BenchRequest]:
    if spec.num_prompts is not None and spec.num_prompts < 1:
        raise BenchError(f"--num-prompts must be at least 1, got {spec.num_prompts}")
    if spec.kind == "random":
        return random_requests(spec, tokenizer)
    if spec.kind == "jsonl":
        return jsonl_requests(spec, tokenizer)
    raise BenchError(f"unknown dataset {spec.kind!r}")


def sample_lengths(
    length: int, range_ratio: float, count: int, rng: np.random.Generator, minimum: int = 1
) -> list[int]:
    """`count` integers uniform in [length*(1-r), length*(1+r)], never below `minimum`."""
    if length < minimum:
        raise BenchError(f"length must be at least {minimum}, got {length}")
    if not 0.0 <= range_ratio < 1.0:
        raise BenchError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    low = max(minimum, int(length * (1 - range_ratio)))
    high = max(low, int(length * (1 + range_ratio)))
    return [int(n) for n in rng.integers(low, high + 1, size=count)]


def random_requests(spec: DatasetSpec, tokenizer: Tokenizer | None) -> list[BenchRequest]:
    count = spec.num_prompts or DEFAULT_RANDOM_PROMPTS
    rng = np.random.default_rng(spec.seed)
    input_lens = sample_lengths(spec.input_len, spec.range_ratio, count, rng)
    output_lens = sample_lengths(spec.output_len, spec.range_ratio, count, rng)
    vocab = _prompt_vocabulary(tokenizer) if tokenizer is not None else None
    requests = []
    for input_len, output_len in zip(input_lens, output_lens, strict=True):
        if vocab is not None:
            prompt: str | list[int] = [int(i) for i in rng.choice(vocab, size=input_len)]
        else:
            prompt = " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=input_len))
        requests.append(_for_endpoint(prompt, spec.endpoint, output_len, input_len, tokenizer))
    return requests


def _prompt_vocabulary(tokenizer: Tokenizer) -> np.ndarray:
    """Ids a random prompt may use: every token except holes and the BOS/EOS/PAD ids, which
    would change how the model reads the prompt. Other special tokens are rare enough to keep."""
    excluded = {*tokenizer.eos_token_ids, tokenizer.bos_token_id, tokenizer.pad_token_id}
    ids = [i for i, tok in enumerate(tokenizer.id_to_token) if tok and i not in excluded]
    if not ids:
        raise BenchError("the tokenizer has no ordinary tokens to build prompts from")
    return np.asarray(ids, dtype=np.int64)


def _for_endpoint(
    prompt: str | list[int],
    endpoint: Endpoint,
    max_tokens: int | None,
    prompt_len: int | None,
    tokenizer: Tokenizer | None,
) -> BenchRequest:
    if endpoint == "completions":
        return BenchRequest(prompt, None, max_tokens, prompt_len)
    if isinstance(prompt, list):
        # Chat takes text only; the chat template adds its own tokens, so the length is approximate.
        assert tokenizer is not None, "token-id prompts come only from a tokenizer"
        prompt = tokenizer.decode(prompt)
    return BenchRequest(None, [{"role": "user", "content": prompt}], max_tokens, prompt_len)


def jsonl_requests(spec: DatasetSpec, tokenizer: Tokenizer | None) -> list[BenchRequest]:
    if not spec.path:
        raise BenchError("--dataset jsonl needs --dataset-path FILE")
    path = Path(spec.path)
    if not path.is_file():
        raise BenchError(f"--dataset-path {path}: no such file")
    requests = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                requests.append(_parse_line(line, f"{path}:{line_no}", spec, tokenizer))
    if not requests:
        raise BenchError(f"{path}: no requests in the file")
    if spec.num_prompts is None:
        return requests
    # Repeat the file when asked for more requests than it holds: a short file still gives load.
    return [requests[i % len(requests)] for i in range(spec.num_prompts)]


def _parse_line(
    line: str, where: str, spec: DatasetSpec, tokenizer: Tokenizer | None
) -> BenchRequest:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BenchError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(item, dict):
        raise BenchError(f"{where}: expected a JSON object")
    max_tokens = item.get("max_tokens", spec.output_len)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise BenchError(f"{where}: max_tokens must be a positive integer")
    prompt, messages = item.get("prompt"), item.get("messages")
    if isinstance(prompt, str) and messages is None:
        prompt_len = len(tokenizer.encode(prompt)) if tokenizer is not None else None
        return _for_endpoint(prompt, spec.endpoint, max_tokens, prompt_len, tokenizer)
    if isinstance(messages, list) and prompt is None:
        if spec.endpoint != "chat":
            raise BenchError(f"{where}: 'messages' needs --endpoint chat")
        return BenchRequest(None, messages, max_tokens)
    raise BenchError(f"{where}: needs exactly one of 'prompt' (string) or 'messages' (list)")

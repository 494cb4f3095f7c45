"""Per-request sampling parameters, validated once at the edge."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Most top alternatives a request may ask for (OpenAI's chat `top_logprobs` limit).
MAX_LOGPROBS = 20
_INT32 = 2**31
_INT64 = 2**63


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `param` names it (for a 400 error body)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. top_k 0 (or -1) disables top-k; top_p 1.0 disables nucleus.
    A seed makes a request's sampling reproducible whatever batch it runs in.
    presence_penalty / frequency_penalty follow OpenAI: each logit is lowered by
    `frequency_penalty * count + presence_penalty * (count > 0)`, where count is how often the
    token occurs in the request's output so far (the prompt does not count).
    logprobs: None is off; k >= 0 returns each sampled token's logprob and the k likeliest
    alternatives, from the model's raw logits (before penalties, temperature and filters).
    cache_salt (vLLM's name): not about sampling, but it travels with these to P and D. It goes
    into the prefix-cache key of the first block, so requests with different salts never share
    KV (engine/prefix_keys.py); None shares with every other unsalted request.
    prior_output_tokens: set by the router when it moves a request to other instances after
    some tokens were streamed (migration): the prompt then ends with the tokens generated so
    far, and these last prompt tokens count as output, for penalties and for the position of
    the seeded noise, so the continuation is the one an undisturbed run would have produced.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    cache_salt: str | None = None
    prior_output_tokens: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """True when sampling needs the request's output so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        _check_finite("temperature", self.temperature)
        if self.temperature < 0.0 or self.temperature > 100.0:
            raise SamplingParamsError("temperature", f"must be in [0, 100], got {self.temperature}")
        _check_finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        # Upper bounds on integers keep them inside msgpack's 64-bit range on the wire.
        if not _is_int(self.top_k) or not -1 <= self.top_k < _INT32:
            raise SamplingParamsError(
                "top_k", f"must be an integer in [-1, {_INT32}), got {self.top_k!r}"
            )
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None and (not _is_int(self.seed) or not -_INT64 <= self.seed < _INT64):
            raise SamplingParamsError(
                "seed", f"must be an integer in [-2^63, 2^63), got {self.seed!r}"
            )
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingParamsError(
                "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}"
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingParamsError("stop", "must be non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", "must be non-negative integers")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_finite(name, value)
            if not -2.0 <= value <= 2.0:
                raise SamplingParamsError(name, f"must be in [-2, 2], got {value}")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise SamplingParamsError(
                "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )
        if self.cache_salt is not None and (
            not isinstance(self.cache_salt, str) or not self.cache_salt
        ):
            raise SamplingParamsError(
                "cache_salt", f"must be a non-empty string, got {self.cache_salt!r}"
            )
        if not _is_int(self.prior_output_tokens) or self.prior_output_tokens < 0:
            raise SamplingParamsError(
                "prior_output_tokens", f"must be an integer >= 0, got {self.prior_output_tokens!r}"
            )


def _check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SamplingParamsError(name, f"must be finite, got {value}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

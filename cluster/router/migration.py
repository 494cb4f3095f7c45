"""Continuing a request on other instances when the ones serving it fail (migration).

When a decode instance dies, or an instance ends a request with an error (a KV transfer that
failed, a lease that expired), the router sends the request again, under a new id, as a request
whose prompt is the original prompt plus every token already released to the client, for the
rest of max_tokens. A prefill instance re-prefills that (its prefix cache still holds the
original prompt's blocks), a decode instance continues, and the stream goes on at the index
where it stopped. `prior_output_tokens` tells the engine that the last tokens of the new
prompt are output: penalties count them, and seeded sampling draws position k's noise for
output position k wherever it runs, so greedy and seeded streams are identical to an
undisturbed run. A request that never produced a token is resent unchanged (a retry).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.sampling_params import SamplingParams

MAX_MOVES = 3  # per request: retries and migrations together


@dataclass(frozen=True)
class Continuation:
    prompt: list[int]
    sampling: SamplingParams


def continuation(
    prompt: list[int], sampling: SamplingParams, released: list[int]
) -> Continuation | None:
    """The request that continues after `released` output tokens; None when max_tokens was
    reached already (nothing is left to generate)."""
    remaining = sampling.max_tokens - len(released)
    if remaining < 1:
        return None
    if not released:
        return Continuation(list(prompt), sampling)
    moved = dataclasses.replace(
        sampling,
        max_tokens=remaining,
        prior_output_tokens=sampling.prior_output_tokens + len(released),
    )
    return Continuation([*prompt, *released], moved)

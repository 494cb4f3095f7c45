"""What the scheduler reports after a step: new tokens per request and whether it finished."""

from __future__ import annotations

from dataclasses import dataclass

from engine.request import RequestStatus

# One sampled token's logprobs, in the form they cross the wire to the router (msgpack-ready, so
# nothing converts them on the way): [logprob, [[token_id, logprob], ...]], the alternatives
# likeliest first, as many as the request asked for. Logprobs are natural logs from the model's
# raw logits.
TokenLogprobs = list


@dataclass
class TokenDelta:
    """New tokens of one request after one step."""

    request_id: str
    new_token_ids: list[int]
    status: RequestStatus
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int  # after this delta; new_token_ids are the last of them
    error: str | None = None
    # One entry per new token when the request asked for logprobs, else None.
    logprobs: list[TokenLogprobs] | None = None

    @property
    def first_index(self) -> int:
        """Index in the output of new_token_ids[0]."""
        return self.num_output_tokens - len(self.new_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished

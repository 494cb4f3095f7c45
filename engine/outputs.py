"""What the scheduler reports after a step: new tokens per request and whether it finished."""

from __future__ import annotations

from dataclasses import dataclass

from engine.request import RequestStatus


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

    @property
    def first_index(self) -> int:
        """Index in the output of new_token_ids[0]."""
        return self.num_output_tokens - len(self.new_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished

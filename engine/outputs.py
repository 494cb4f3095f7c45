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
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status.finished

"""OpenAI response bodies and server-sent-event chunks, for completions and chat.

A response has n choices (indexed 0..n-1); a streamed chunk carries one choice's delta.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from cluster.router.logprobs import (
    ChatLogprobs,
    CompletionLogprobs,
    LogprobsFormatter,
    TokenTexts,
)

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(frozen=True)
class ChoiceResult:
    """One choice of a whole (non-streamed) response."""

    index: int
    text: str
    finish_reason: str
    logprobs: dict | None = None  # already in the endpoint's shape


@dataclass
class ResponseShape:
    """Ids and envelope shared by the bodies of one response."""

    request_id: str
    model: str
    include_usage: bool = False  # streaming: a null usage in each chunk, then a usage chunk
    created: int = field(default_factory=lambda: int(time.time()))

    id_prefix = ""
    object_name = ""
    chunk_object_name = ""

    @property
    def id(self) -> str:
        return f"{self.id_prefix}{self.request_id}"

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _chunk(self, choice: dict) -> dict:
        body = self._envelope(self.chunk_object_name, [choice])
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: Usage) -> dict:
        body = self._envelope(self.chunk_object_name, [])
        body["usage"] = usage.as_dict()
        return body

    def final(self, choices: list[ChoiceResult], usage: Usage) -> dict:
        body = self._envelope(self.object_name, [self._final_choice(c) for c in choices])
        body["usage"] = usage.as_dict()
        return body

    def start_chunks(self, n: int = 1) -> list[dict]:
        """Chunks sent before any text."""
        return []

    def new_logprobs(self, texts: TokenTexts) -> LogprobsFormatter:
        """A formatter for one choice's logprobs in this endpoint's shape."""
        raise NotImplementedError

    def _final_choice(self, choice: ChoiceResult) -> dict:
        raise NotImplementedError

    def text_chunk(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None
    ) -> dict:
        raise NotImplementedError


class CompletionShape(ResponseShape):
    id_prefix = "cmpl-"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def new_logprobs(self, texts: TokenTexts) -> LogprobsFormatter:
        return CompletionLogprobs(texts)

    def _final_choice(self, choice: ChoiceResult) -> dict:
        return {
            "index": choice.index,
            "text": choice.text,
            "finish_reason": choice.finish_reason,
            "logprobs": choice.logprobs,
        }

    def text_chunk(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None
    ) -> dict:
        return self._chunk(
            {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
        )


class ChatShape(ResponseShape):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def new_logprobs(self, texts: TokenTexts) -> LogprobsFormatter:
        return ChatLogprobs(texts)

    def _final_choice(self, choice: ChoiceResult) -> dict:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "finish_reason": choice.finish_reason,
            "logprobs": choice.logprobs,
        }

    def start_chunks(self, n: int = 1) -> list[dict]:
        return [self._delta(i, {"role": "assistant", "content": ""}, None) for i in range(n)]

    def text_chunk(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None
    ) -> dict:
        return self._delta(index, {"content": text} if text else {}, finish_reason, logprobs)

    def _delta(
        self, index: int, delta: dict, finish_reason: str | None, logprobs: dict | None = None
    ) -> dict:
        return self._chunk(
            {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        )

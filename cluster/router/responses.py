"""OpenAI response bodies and server-sent-event chunks, for completions and chat."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

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

    def start_chunks(self) -> list[dict]:
        """Chunks sent before any text."""
        return []

    def final(self, text: str, finish_reason: str, usage: Usage) -> dict:
        raise NotImplementedError

    def text_chunk(self, text: str, finish_reason: str | None) -> dict:
        raise NotImplementedError


class CompletionShape(ResponseShape):
    id_prefix = "cmpl-"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def final(self, text: str, finish_reason: str, usage: Usage) -> dict:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        body = self._envelope(self.object_name, [choice])
        body["usage"] = usage.as_dict()
        return body

    def text_chunk(self, text: str, finish_reason: str | None) -> dict:
        return self._chunk(
            {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        )


class ChatShape(ResponseShape):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def final(self, text: str, finish_reason: str, usage: Usage) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "logprobs": None,
        }
        body = self._envelope(self.object_name, [choice])
        body["usage"] = usage.as_dict()
        return body

    def start_chunks(self) -> list[dict]:
        return [self._delta({"role": "assistant", "content": ""}, None)]

    def text_chunk(self, text: str, finish_reason: str | None) -> dict:
        return self._delta({"content": text} if text else {}, finish_reason)

    def _delta(self, delta: dict, finish_reason: str | None) -> dict:
        return self._chunk(
            {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        )

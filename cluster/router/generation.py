"""One request from the HTTP side: the token stream turned into text, stop strings applied.

Stop strings are matched here, on the detokenized text, not on the instances: the router is
the only place that has the text. On a match the request is released, which aborts it on every
instance, and the response ends with finish_reason "stop".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cluster.router.dispatcher import Dispatcher
from cluster.router.responses import Usage
from cluster.router.streams import RequestStream, TokenTimeout
from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import TokenLogprobs


@dataclass(frozen=True)
class TextDelta:
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last delta
    # The tokens behind this delta and their logprobs, when the request asked for logprobs
    # (the text of a token may show up in a later delta: text waits for whole characters).
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] | None = None


class InstanceFailed(Exception):
    """An instance ended the request with an error (or aborted it on its own)."""


class InstanceOverloaded(InstanceFailed):
    """No capacity for the request now (P's blocks or queue, or every D full): retry later."""


class Generation:
    """Text deltas of one request; `close()` (idempotent) frees it in the router."""

    def __init__(
        self, dispatcher: Dispatcher, stream: RequestStream, detokenizer: IncrementalDetokenizer
    ) -> None:
        self._dispatcher = dispatcher
        self._stream = stream
        self._detokenizer = detokenizer
        self.num_output_tokens = 0

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    def usage(self) -> Usage:
        return Usage(
            self._stream.num_prompt_tokens, self.num_output_tokens, self._stream.num_cached_tokens
        )

    def close(self, reason: str, timed_out: bool = False, outcome: str | None = None) -> None:
        self._dispatcher.release(self.request_id, reason, timed_out=timed_out, outcome=outcome)

    async def deltas(self) -> AsyncIterator[TextDelta]:
        """Non-empty text (or tokens with logprobs) as it becomes safe to show; the last delta
        carries finish_reason. Raises TokenTimeout or InstanceFailed; the request is released
        before either."""
        while True:
            try:
                update = await self._stream.next()
            except TokenTimeout as exc:
                self.close(f"timeout: {exc}", timed_out=True)
                raise
            self.num_output_tokens += len(update.token_ids)
            delta = self._detokenizer.push(update.token_ids)
            tokens, logprobs = update.token_ids, update.logprobs
            if delta.stopped:
                # The instances are still generating (they are aborted); the client saw "stop".
                self.close("stop string matched", outcome="stop")
                yield TextDelta(delta.text, "stop", tokens, logprobs)
                return
            finish = update.finish
            if finish is None:
                if delta.text or logprobs:
                    yield TextDelta(delta.text, None, tokens, logprobs)
                continue
            self.close(f"finished: {finish.reason}")
            if finish.reason in ("stop", "length"):
                text = delta.text + self._detokenizer.flush()
                yield TextDelta(text, finish.reason, tokens, logprobs)
                return
            detail = finish.error or "no detail given"
            failure = InstanceOverloaded if finish.reason == "overloaded" else InstanceFailed
            raise failure(f"instance {self._stream.instance}: request {finish.reason}: {detail}")

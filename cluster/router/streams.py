"""One in-flight request as the router sees it: its tokens in output order, the deadlines for
the next one, the instances that served it, and the timings for metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

from cluster.config import RouterConfig
from cluster.metrics import RequestRecord
from cluster.router.ordering import Finish, TokenOrderer
from engine.outputs import TokenLogprobs
from engine.protocol.identity import InstanceId
from engine.protocol.tokens import Timings, TokenItem


class TokenTimeout(Exception):
    """The first or the next token did not come in time; the message says which."""


@dataclass(frozen=True)
class StreamUpdate:
    """What arrived since the last `RequestStream.next()`: tokens in order, and the end if any.
    `logprobs` is aligned with token_ids when the request asked for logprobs, else None."""

    token_ids: list[int]
    finish: Finish | None
    logprobs: list[TokenLogprobs | None] | None = None


class RequestStream:
    """One request's tokens as they come back, in output order, with deadlines."""

    def __init__(
        self,
        request_id: str,
        instance: InstanceId,
        num_prompt_tokens: int,
        config: RouterConfig,
        logprobs: bool = False,
    ) -> None:
        self.request_id = request_id  # of the current attempt
        self.first_id = request_id
        self.instance = instance
        self.decode_instance: InstanceId | None = None  # known from P's first item in PD mode
        self.sources: set[InstanceId] = set()  # instances that sent tokens for it
        self.attempt = 0  # times it was sent again, retried or migrated (GenerateRequest.attempt)
        self.capacity_retries = 0  # of those, resends after a capacity refusal (capacity_wait.py)
        self.output_ids: list[int] = []  # every token released so far, what a move resends
        self._index_offset = 0  # output index of the current run's token 0
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.token_gaps: list[float] = []  # seconds between consecutive tokens, for ITL
        self.num_prompt_tokens = num_prompt_tokens
        # The part of the prompt its prefill instance must compute (the rest is expected to be
        # cached there): what it adds to that instance's outstanding prefill tokens.
        self.prefill_tokens = num_prompt_tokens
        self.num_cached_tokens = 0
        self.cached_tokens_by: dict[InstanceId, int] = {}  # prefix-cache hits each source reported
        self.decode_hint: InstanceId | None = None  # the decode instance the router preferred
        self.stamps = Timings()  # server-side timings from the instances
        self.awaiting_first_token = True  # its prompt counts as outstanding prefill work
        self._config = config
        self._orderer = TokenOrderer(keep_logprobs=logprobs)
        self._ready = asyncio.Event()
        self._tokens: list[int] = []
        self._logprobs: list[TokenLogprobs | None] | None = [] if logprobs else None
        self._delivered_any = False

    def holders(self) -> set[InstanceId]:
        """Instances that may hold state for this request: the one it was sent to, the decode
        instance P reported, and any that sent tokens."""
        return {n for n in (self.instance, self.decode_instance, *self.sources) if n}

    @property
    def finish(self) -> Finish | None:
        return self._orderer.finished

    def add(self, item: TokenItem) -> int:
        """Take an item from an instance; returns how many of its tokens were duplicates."""
        if self._index_offset:  # a migrated run counts its output from 0
            item = dataclasses.replace(item, first_index=item.first_index + self._index_offset)
        else:  # a migrated run's prompt holds output: its cache hits are not the prompt's
            self.num_cached_tokens = max(self.num_cached_tokens, item.num_cached_tokens)
        self.decode_instance = item.decode_instance or self.decode_instance
        if item.timings is not None:
            self.stamps.update(item.timings)
        duplicates_before = self._orderer.duplicates
        tokens = self._orderer.add(item)
        self._tokens.extend(tokens)
        self.output_ids.extend(tokens)
        if tokens:
            self._note_arrival(len(tokens))
        if self._logprobs is not None:
            self._logprobs.extend(self._orderer.take_logprobs())
        if tokens or self._orderer.finished is not None:
            self._ready.set()
        return self._orderer.duplicates - duplicates_before

    def move(self, instance: InstanceId) -> None:
        """Continue as the next attempt on `instance`, whose output token 0 is this stream's next
        token (see migration.py); tokens held back behind a gap will come again. The attempt is
        a request of its own on the wire, its id made from the first one (never parsed back)."""
        self.attempt += 1
        self.request_id = f"{self.first_id}~{self.attempt}"
        self.instance = instance
        self.decode_instance = None
        self.sources = set()
        self.awaiting_first_token = True
        self._orderer.forget_pending()
        self._index_offset = len(self.output_ids)

    def _note_arrival(self, count: int) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            count -= 1  # the first token has no gap before it
        elif count:
            # Tokens that arrive together share the gap since the previous arrival.
            self.token_gaps.extend([(now - self.last_token_at) / count] * count)
        self.last_token_at = now

    def record(self, phases: dict[str, float], outcome: str) -> RequestRecord:
        return RequestRecord(
            outcome=outcome,
            prompt_tokens=self.num_prompt_tokens,
            output_tokens=len(self.token_gaps) + (self.first_token_at is not None),
            arrival=self.arrival,
            first_token=self.first_token_at,
            finished=self.last_token_at or time.monotonic(),
            token_gaps=self.token_gaps,
            phases=phases,
        )

    def fail(self, reason: str, error: str) -> None:
        self.add(TokenItem(self.request_id, 0, [], reason, error))

    async def next(self) -> StreamUpdate:
        """Tokens that arrived since the last call (waits for at least one, or the end)."""
        if not self._ready.is_set():
            first = not self._delivered_any
            timeout = (
                self._config.first_token_timeout_s if first else self._config.next_token_timeout_s
            )
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                which = "first token" if first else "next token"
                raise TokenTimeout(f"no {which} from the instances within {timeout:g} s") from None
        self._ready.clear()
        tokens, self._tokens = self._tokens, []
        logprobs = self._logprobs
        if logprobs is not None:
            self._logprobs = []
        self._delivered_any = self._delivered_any or bool(tokens)
        return StreamUpdate(tokens, self._orderer.finished, logprobs)

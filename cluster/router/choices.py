"""The n choices of one response: n independent requests on the instances, merged.

A request with `n` > 1 is submitted n times (a seeded one with seed, seed + 1, ...), each under
its own request id, so the instances need not know about choices. Their deltas are merged in
arrival order, tagged with the choice index. The first failure of any choice fails the whole
response; closing the set releases (so aborts) every choice still running.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from cluster.router.dispatcher import Dispatcher
from cluster.router.generation import Generation, TextDelta
from cluster.router.responses import Usage
from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

_INT64 = 2**63
_Item = tuple[int, TextDelta | None, BaseException | None]  # (index, delta, error)


def choice_seed(seed: int | None, index: int) -> int | None:
    """Seed of choice `index`: seed + index, wrapped into the signed 64-bit range."""
    if seed is None:
        return None
    return (seed + index + _INT64) % (2 * _INT64) - _INT64


def choice_request_id(request_id: str, index: int, n: int) -> str:
    """A single choice keeps the response's id; several get a suffix each."""
    return request_id if n == 1 else f"{request_id}-{index}"


async def submit_choices(
    dispatcher: Dispatcher,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    sampling: SamplingParams,
    request_id: str,
    n: int,
) -> ChoiceSet:
    """Submit the n requests; if one cannot be submitted, release those that were and raise."""
    dispatcher.check_capacity(n)  # all n or none, before anything reaches an instance
    generations: list[Generation] = []
    try:
        for index in range(n):
            params = sampling
            if n > 1 and sampling.seed is not None:
                params = dataclasses.replace(sampling, seed=choice_seed(sampling.seed, index))
            stream = await dispatcher.submit(
                prompt_ids, params, request_id=choice_request_id(request_id, index, n)
            )
            detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, sampling.stop)
            generations.append(Generation(dispatcher, stream, detokenizer))
    except BaseException:
        for generation in generations:
            generation.close("another choice could not be submitted")
        raise
    return ChoiceSet(generations)


class ChoiceSet:
    """Deltas of n generations through `next()`; `close()` (idempotent) ends them all."""

    def __init__(self, generations: list[Generation]) -> None:
        assert generations
        self.generations = generations
        self._iterators = [g.deltas() for g in generations]
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._running = len(generations)

    @property
    def n(self) -> int:
        return len(self.generations)

    def usage(self) -> Usage:
        """The prompt counts once (as OpenAI bills n > 1); completions add up. Cached tokens
        are those every choice found in the prefix cache."""
        usages = [g.usage() for g in self.generations]
        return Usage(
            prompt_tokens=usages[0].prompt_tokens,
            completion_tokens=sum(u.completion_tokens for u in usages),
            cached_tokens=min(u.cached_tokens for u in usages),
        )

    def close(self, reason: str) -> None:
        for pump in self._pumps:
            pump.cancel()
        for generation in self.generations:
            generation.close(reason)

    async def next(self) -> tuple[int, TextDelta] | None:
        """The next delta of any choice with its index; None once every choice finished.
        Raises the first error of any choice (TokenTimeout or InstanceFailed)."""
        if self.n == 1:
            # One choice: no merging, so no extra task and queue on the common path.
            try:
                return 0, await anext(self._iterators[0])
            except StopAsyncIteration:
                return None
        if not self._pumps:
            loop = asyncio.get_running_loop()
            self._pumps = [
                loop.create_task(self._pump(i, it)) for i, it in enumerate(self._iterators)
            ]
        while self._running:
            index, delta, error = await self._queue.get()
            if error is not None:
                raise error
            if delta is None:
                self._running -= 1
                continue
            return index, delta
        return None

    async def _pump(self, index: int, deltas: AsyncIterator[TextDelta]) -> None:
        try:
            async for delta in deltas:
                self._queue.put_nowait((index, delta, None))
        except Exception as exc:  # handed to the consumer, which fails the response
            self._queue.put_nowait((index, None, exc))
            return
        self._queue.put_nowait((index, None, None))

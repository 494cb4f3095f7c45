"""Turning a validated, tokenized request into an HTTP response: one JSON body, or SSE.

The request's n choices run as separate requests (choices.py); the body merges them.

Streaming responses wait for the first text (of any choice) before sending headers, so a request
that fails before producing anything (timeout, instance error) still gets a proper status code.
A client that goes away is noticed while waiting (a watcher on the ASGI receive channel, and
Starlette's own disconnect listener once streaming); either way the request is released, which
aborts it on every instance.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from cluster.router.choices import ChoiceSet, submit_choices
from cluster.router.dispatcher import Dispatcher
from cluster.router.generation import InstanceFailed, TextDelta
from cluster.router.logprobs import LogprobsFormatter, TokenTexts
from cluster.router.openai_api import error_body
from cluster.router.responses import SSE_DONE, ChoiceResult, ResponseShape, sse
from cluster.router.streams import TokenTimeout
from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

T = TypeVar("T")
_CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client went away"; nobody reads it


class ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


@dataclass(frozen=True)
class ServeJob:
    """A validated, tokenized request: what to generate and how to answer."""

    prompt_ids: list[int]
    sampling: SamplingParams
    shape: ResponseShape
    stream: bool
    n: int = 1


async def serve_request(
    dispatcher: Dispatcher,
    tokenizer: Tokenizer,
    token_texts: TokenTexts,
    request: Request,
    job: ServeJob,
) -> Response:
    """Raises Overloaded, NoInstance, TokenTimeout or InstanceFailed for the caller to map."""
    choices = await submit_choices(
        dispatcher, tokenizer, job.prompt_ids, job.sampling, job.shape.request_id, job.n
    )
    formatters = _formatters(job, token_texts)
    try:
        if job.stream:
            return await _start_stream(request, choices, job.shape, formatters)
        results = await _unless_disconnected(request, _collect(choices, formatters))
        return JSONResponse(job.shape.final(results, choices.usage()))
    except ClientGone:
        choices.close("client disconnected")
        return Response(status_code=_CLIENT_CLOSED_REQUEST)
    except BaseException:
        choices.close("request failed")
        raise


def _formatters(job: ServeJob, token_texts: TokenTexts) -> list[LogprobsFormatter] | None:
    """One logprobs formatter per choice, or None when the request did not ask for logprobs."""
    if job.sampling.logprobs is None:
        return None
    return [job.shape.new_logprobs(token_texts) for _ in range(job.n)]


@dataclass
class _ChoiceText:
    parts: list[str] = field(default_factory=list)
    finish_reason: str = "length"
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)


async def _collect(
    choices: ChoiceSet, formatters: list[LogprobsFormatter] | None
) -> list[ChoiceResult]:
    texts = [_ChoiceText() for _ in range(choices.n)]
    while (item := await choices.next()) is not None:
        index, delta = item
        choice = texts[index]
        choice.parts.append(delta.text)
        choice.finish_reason = delta.finish_reason or choice.finish_reason
        if delta.logprobs is not None:
            choice.token_ids += delta.token_ids
            choice.logprobs += delta.logprobs
    return [
        ChoiceResult(
            index,
            "".join(c.parts),
            c.finish_reason,
            formatters[index].format(c.token_ids, c.logprobs) if formatters else None,
        )
        for index, c in enumerate(texts)
    ]


async def _start_stream(
    request: Request,
    choices: ChoiceSet,
    shape: ResponseShape,
    formatters: list[LogprobsFormatter] | None,
) -> Response:
    first = await _unless_disconnected(request, choices.next())
    events = _events(choices, first, shape, formatters)
    return _EventStream(events, on_close=lambda: choices.close("client disconnected"))


async def _events(
    choices: ChoiceSet,
    first: tuple[int, TextDelta] | None,
    shape: ResponseShape,
    formatters: list[LogprobsFormatter] | None,
) -> AsyncIterator[bytes]:
    for chunk in shape.start_chunks(choices.n):
        yield sse(chunk)
    item = first
    try:
        while item is not None:
            index, delta = item
            logprobs = None
            if formatters is not None and delta.logprobs:
                logprobs = formatters[index].format(delta.token_ids, delta.logprobs)
            if delta.text or logprobs:
                yield sse(shape.text_chunk(index, delta.text, None, logprobs))
            if delta.finish_reason is not None:
                yield sse(shape.text_chunk(index, "", delta.finish_reason))
            item = await choices.next()
    except (TokenTimeout, InstanceFailed) as exc:
        # Headers are out already: the error goes in the stream, as OpenAI's servers do.
        code = "timeout" if isinstance(exc, TokenTimeout) else "instance_error"
        yield sse(error_body(str(exc), "server_error", code=code))
        yield SSE_DONE
        return
    if shape.include_usage:
        yield sse(shape.usage_chunk(choices.usage()))
    yield SSE_DONE


class _EventStream(StreamingResponse):
    """SSE response that runs `on_close` however the stream ends (done, error, disconnect)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, or raise ClientGone (cancelling it) if the client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watcher):
            if not task.done():
                task.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    raise ClientGone


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass

"""Turning a validated, tokenized request into an HTTP response: one JSON body, or SSE.

Streaming responses wait for the first text before sending headers, so a request that fails
before producing anything (timeout, instance error) still gets a proper status code. A client
that goes away is noticed while waiting (a watcher on the ASGI receive channel, and Starlette's
own disconnect listener once streaming); either way the request is released, which aborts it on
every instance.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from cluster.router.dispatcher import Dispatcher, TokenTimeout
from cluster.router.generation import Generation, InstanceFailed, TextDelta
from cluster.router.openai_api import error_body
from cluster.router.responses import SSE_DONE, ResponseShape, sse
from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

T = TypeVar("T")
_CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client went away"; nobody reads it


class ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


async def serve_request(
    dispatcher: Dispatcher,
    tokenizer: Tokenizer,
    request: Request,
    prompt_ids: list[int],
    sampling: SamplingParams,
    shape: ResponseShape,
    stream: bool,
) -> Response:
    """Raises Overloaded, NoInstance, TokenTimeout or InstanceFailed for the caller to map."""
    submitted = await dispatcher.submit(prompt_ids, sampling, request_id=shape.request_id)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, sampling.stop)
    generation = Generation(dispatcher, submitted, detokenizer)
    try:
        if stream:
            return await _start_stream(request, generation, shape)
        text, finish_reason = await _unless_disconnected(request, _collect(generation))
        return JSONResponse(shape.final(text, finish_reason, generation.usage()))
    except ClientGone:
        generation.close("client disconnected")
        return Response(status_code=_CLIENT_CLOSED_REQUEST)
    except BaseException:
        generation.close("request failed")
        raise


async def _collect(generation: Generation) -> tuple[str, str]:
    parts: list[str] = []
    finish_reason = "length"
    async for delta in generation.deltas():
        parts.append(delta.text)
        finish_reason = delta.finish_reason or finish_reason
    return "".join(parts), finish_reason


async def _start_stream(request: Request, generation: Generation, shape: ResponseShape) -> Response:
    deltas = generation.deltas()

    async def first_delta() -> TextDelta:
        return await anext(deltas)

    first = await _unless_disconnected(request, first_delta())
    events = _events(generation, deltas, first, shape)
    return _EventStream(events, on_close=lambda: generation.close("client disconnected"))


async def _events(
    generation: Generation, deltas: AsyncIterator[TextDelta], first: TextDelta, shape: ResponseShape
) -> AsyncIterator[bytes]:
    for chunk in shape.start_chunks():
        yield sse(chunk)
    delta = first
    try:
        while True:
            if delta.text:
                yield sse(shape.text_chunk(delta.text, None))
            if delta.finish_reason is not None:
                yield sse(shape.text_chunk("", delta.finish_reason))
                break
            delta = await anext(deltas)
    except (TokenTimeout, InstanceFailed) as exc:
        # Headers are out already: the error goes in the stream, as OpenAI's servers do.
        code = "timeout" if isinstance(exc, TokenTimeout) else "instance_error"
        yield sse(error_body(str(exc), "server_error", code=code))
        yield SSE_DONE
        return
    if shape.include_usage:
        yield sse(shape.usage_chunk(generation.usage()))
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

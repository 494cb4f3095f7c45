"""Streaming OpenAI client that timestamps every content chunk of a request.

Timing contract (all on time.perf_counter, seconds):
- the clock starts just before the POST is written;
- TTFT is the arrival of the first chunk with non-empty text (role-only and finish-only chat
  chunks are not tokens);
- ITL holds the gaps between consecutive content chunks; a chunk may carry several tokens when
  the server batches or holds back partial UTF-8, so ITL is per chunk, not per token;
- output tokens come from the final usage chunk (we always ask for it), else the chunk count;
- e2e ends when the stream ends ([DONE] or connection close).
A request fails on an HTTP status other than 200, an error object inside the stream, a
transport error, the per-request timeout, or a stream that ends without any content.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import httpx

from cluster.bench import BenchError
from cluster.bench.datasets import BenchRequest, Endpoint

_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestRecord:
    """What one request measured; times in seconds, `start_s` relative to the benchmark start."""

    index: int
    success: bool = False
    error: str = ""
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    usage_reported: bool = False  # output_tokens came from the server, not the chunk count
    max_tokens: int | None = None
    text: str = ""  # the streamed output (a multi-turn client appends it to its conversation)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; undefined for a single-token output."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def end_s(self) -> float:
        return self.start_s + (self.e2e_s or 0.0)

    def chunk_times_s(self) -> list[float]:
        """Arrival time of each content chunk, relative to the benchmark start."""
        if self.ttft_s is None:
            return []
        times = [self.start_s + self.ttft_s]
        for gap in self.itl_s:
            times.append(times[-1] + gap)
        return times

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tpot_s": self.tpot_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class StreamError(Exception):
    """The server reported a failure: an HTTP error status or an error object in the stream."""


def build_payload(
    request: BenchRequest,
    endpoint: Endpoint,
    model: str,
    temperature: float,
    ignore_eos: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model}
    if endpoint == "chat":
        if request.messages is None:
            raise BenchError("the chat endpoint needs messages, not a prompt")
        body["messages"] = request.messages
    else:
        if request.prompt is None:
            raise BenchError("the completions endpoint needs a prompt, not messages")
        body["prompt"] = request.prompt
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    body["temperature"] = temperature
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    if ignore_eos:  # an extension: strict OpenAI servers reject unknown fields, so only when asked
        body["ignore_eos"] = True
    return body


def normalize_base_url(url: str) -> str:
    """Accept http://host:port, .../ and .../v1 alike."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class OpenAIClient:
    """One HTTP connection pool for the whole run; use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_connections: int | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # httpx caps a pool at 100 connections by default, which would silently cap concurrency.
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> OpenAIClient:
        self._http = httpx.AsyncClient(
            headers=self._headers, limits=self._limits, timeout=httpx.Timeout(self.timeout)
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._http is not None
        await self._http.aclose()
        self._http = None

    async def first_model(self) -> str:
        """The first model id the server lists (GET /v1/models)."""
        assert self._http is not None, "use the client as an async context manager"
        url = f"{self.base_url}/v1/models"
        try:
            response = await self._http.get(url)
        except httpx.HTTPError as exc:
            raise BenchError(f"GET {url}: {_describe(exc)}") from exc
        if response.status_code != 200:
            raise BenchError(
                f"GET {url}: HTTP {response.status_code}: {_error_text(response.text)}"
            )
        models = response.json().get("data") or []
        if not models:
            raise BenchError(f"GET {url}: the server lists no models; pass --model")
        return str(models[0]["id"])

    async def server_info(self) -> dict[str, Any]:
        """GET /version where the server has it (pdserve, vLLM): {"version", "deployment"?};
        {} from a server without it -- it only labels the report."""
        assert self._http is not None, "use the client as an async context manager"
        try:
            response = await self._http.get(f"{self.base_url}/version")
            body = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}

    async def send(
        self, index: int, endpoint: Endpoint, payload: dict[str, Any], origin: float
    ) -> RequestRecord:
        """Stream one request; never raises for a failed request, the record says why."""
        record = RequestRecord(index=index, max_tokens=payload.get("max_tokens"))
        start = time.perf_counter()
        record.start_s = start - origin
        try:
            await asyncio.wait_for(self._stream(endpoint, payload, record, start), self.timeout)
        except asyncio.TimeoutError:
            record.error = f"timed out after {self.timeout:g} s"
        except StreamError as exc:
            record.error = str(exc)
        except httpx.HTTPError as exc:
            record.error = _describe(exc)
        record.e2e_s = time.perf_counter() - start
        if not record.error and record.ttft_s is None:
            record.error = "the stream ended without any content"
        record.success = not record.error
        return record

    async def _stream(
        self, endpoint: Endpoint, payload: dict[str, Any], record: RequestRecord, start: float
    ) -> None:
        assert self._http is not None, "use the client as an async context manager"
        url = f"{self.base_url}{_PATHS[endpoint]}"
        last = start
        chunks = 0
        async with self._http.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                raise StreamError(f"HTTP {response.status_code}: {_error_text(body)}")
            async for line in response.aiter_lines():
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event == "[DONE]":
                    break
                now = time.perf_counter()
                text = chunk_text(event, endpoint)
                if text:
                    record.text += text
                    if chunks == 0:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last)
                    last = now
                    chunks += 1
                _apply_usage(event, record)
        if not record.usage_reported:
            record.output_tokens = chunks


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """A `data:` line's JSON object, "[DONE]", or None for blank lines, comments and other
    fields. Raises StreamError for an error event, as OpenAI servers send after the headers."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if data == "[DONE]":
        return data
    try:
        event = json.loads(data)
    except json.JSONDecodeError as exc:
        raise StreamError(f"malformed stream event: {data[:200]!r}") from exc
    if not isinstance(event, dict):
        raise StreamError(f"malformed stream event: {data[:200]!r}")
    if event.get("error"):
        raise StreamError(f"error in stream: {_error_text(json.dumps(event))}")
    return event


def chunk_text(event: dict[str, Any], endpoint: Endpoint) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if endpoint == "completions":
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # Reasoning models stream their thinking first; those are output tokens too.
    return delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""


def _apply_usage(event: dict[str, Any], record: RequestRecord) -> None:
    usage = event.get("usage")
    if not isinstance(usage, dict):
        return
    if isinstance(usage.get("prompt_tokens"), int):
        record.prompt_tokens = usage["prompt_tokens"]
    if isinstance(usage.get("completion_tokens"), int):
        record.output_tokens = usage["completion_tokens"]
        record.usage_reported = True


def _error_text(body: str) -> str:
    """The message of an OpenAI-style (or FastAPI-style) error body, else the body itself."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:500]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if data.get("detail"):
            return str(data["detail"])
    return body.strip()[:500]


def _describe(exc: BaseException) -> str:
    # Some httpx errors (e.g. ReadTimeout) stringify as "", so lead with the type.
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

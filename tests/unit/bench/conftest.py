"""A tiny OpenAI-compatible server for the bench tests, and a tiny tokenizer folder.

The server streams `chunks` content chunks, the first after `first_delay` and the rest `delay`
apart, so measured TTFT/ITL/TPOT can be checked against known values. It honours
stream_options.include_usage, counts concurrent streams, and fails every `fail_every`-th
request either with HTTP 500 or with an error event inside the stream.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from cluster.bench.datasets import _WORDS

MODEL_ID = "fake-model"


@dataclass
class Behaviour:
    chunks: int = 5
    first_delay: float = 0.05
    delay: float = 0.02
    tokens_per_chunk: int = 1
    fail_every: int = 0  # 0: never; k: the k-th, 2k-th, ... requests fail
    fail_in_stream: bool = False  # fail after the first chunk instead of with HTTP 500
    send_usage: bool = True  # False: ignore include_usage, like some servers


class FakeOpenAI:
    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.bodies: list[dict[str, Any]] = []
        self.active = 0
        self.max_active = 0
        self.app = self._build_app()

    def reset(self, **changes: Any) -> FakeOpenAI:
        self.behaviour = Behaviour(**changes)
        self.bodies = []
        self.active = self.max_active = 0
        return self

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def list_models() -> dict:
            return {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]}

        @app.get("/version")
        async def version() -> dict:  # what a pdserve router answers
            deployment = {
                "model": MODEL_ID,
                "model_path": "/models/fake",
                "device": "cpu",
                "dtype": "float32",
                "load_format": "safetensors",
                "instances": {"prefill": 2, "decode": 1, "mixed": 0},
                "topology": "2P1D",
                "transfer": "tcp",
            }
            return {"version": "9.9.9", "deployment": deployment}

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._serve(await request.json(), chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._serve(await request.json(), chat=True)

        return app

    async def _serve(self, body: dict[str, Any], chat: bool):
        self.bodies.append(body)
        b = self.behaviour
        failing = b.fail_every > 0 and len(self.bodies) % b.fail_every == 0
        if failing and not b.fail_in_stream:
            error = {"message": "injected failure", "type": "server_error"}
            return JSONResponse({"error": error}, status_code=500)
        usage = b.send_usage and (body.get("stream_options") or {}).get("include_usage", False)
        events = self._events(chat, usage, failing)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _events(self, chat: bool, usage: bool, failing: bool) -> AsyncIterator[bytes]:
        b = self.behaviour
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if chat:  # the role-only chunk comes at once and is not a token
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            for i in range(b.chunks):
                await asyncio.sleep(b.first_delay if i == 0 else b.delay)
                text = f" tok{i}"
                choice = {"index": 0, "delta": {"content": text}} if chat else {"text": text}
                yield _sse({"choices": [choice]})
                if failing:
                    yield _sse({"error": {"message": "injected stream failure"}})
                    break
            if usage and not failing:
                tokens = b.chunks * b.tokens_per_chunk
                yield _sse(
                    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": tokens}}
                )
            yield b"data: [DONE]\n\n"
        finally:
            self.active -= 1


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


@pytest.fixture(scope="session")
def fake_server() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    config = uvicorn.Config(fake.app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def fake(fake_server: tuple[FakeOpenAI, str]) -> FakeOpenAI:
    return fake_server[0].reset()


@pytest.fixture
def base_url(fake_server: tuple[FakeOpenAI, str]) -> str:
    return fake_server[1]


@pytest.fixture(scope="session")
def word_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer folder: one token per whitespace-separated word."""
    folder = tmp_path_factory.mktemp("word-tokenizer")
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *_WORDS])}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder

"""SIGTERM to `pdserve serve` while streams run: it drains and exits cleanly.

The CLI runs as a subprocess on its own embedded Ray, the way systemd or Kubernetes run it.
Streams in flight all finish, a new request gets 503 with Retry-After, /ready turns false, the
process exits 0 within router.drain_timeout_s + 10 s with no stack trace in its output, and no
process it started (gcs_server, raylet, Ray's agents, workers) is left running.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.integration.harness import prompts, small_config

pytestmark = pytest.mark.timeout(900)

DRAIN_TIMEOUT_S = 120.0  # far more than the streams need: they must finish, not be cut
MAX_TOKENS = 32
STREAMS = 4
_REPO = Path(__file__).resolve().parents[2]
_STACK_MARKERS = ("Traceback", "SIGTERM received", "*** ", "CancelledError", "logging.cc")


class ServerProcess:
    """`python -m cluster.cli serve` with its output collected and its process tree tracked."""

    def __init__(self, config_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", str(config_path), "--port", "0"],
            cwd=_REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self._serving = threading.Event()
        self.tree: dict[int, psutil.Process] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            found = re.search(r"serving (http://\S+)/v1", line)
            if found:
                self.url = found.group(1)
                self._serving.set()
        self._serving.set()  # exited: stop waiting

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_serving(self, timeout_s: float) -> str:
        assert self._serving.wait(timeout_s), f"not serving after {timeout_s} s:\n{self.output}"
        assert self.url, f"exited before serving:\n{self.output}"
        return self.url

    def track_tree(self) -> None:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            self.tree.setdefault(child.pid, child)

    def left_running(self) -> list[str]:
        return [f"{p.name()}[{p.pid}]" for p in self.tree.values() if _running(p)]

    def kill_all(self) -> None:
        for proc in [psutil.Process(self.proc.pid), *self.tree.values()]:
            if _running(proc):
                proc.kill()
        self.proc.wait(30)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    config = small_config(
        router={"drain_timeout_s": DRAIN_TIMEOUT_S},
        decode={"engine": {"scheduler": {"max_num_seqs": 8}}},
    )
    path = tmp_path_factory.mktemp("shutdown") / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    srv = ServerProcess(path)
    try:
        srv.wait_serving(600)
        srv.track_tree()
        yield srv
    finally:
        if srv.proc.poll() is None or srv.left_running():
            srv.kill_all()  # a failed test must not leave a cluster behind


async def _stream(client: httpx.AsyncClient, prompt: str, started: asyncio.Event) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result: dict = {"finish_reason": None, "errors": [], "usage": None, "done": False}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                result["done"] = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result["errors"].append(chunk["error"])
            elif chunk.get("usage"):
                result["usage"] = chunk["usage"]
            else:
                started.set()
                result["finish_reason"] = chunk["choices"][0]["finish_reason"] or None
    return result


async def _sigterm_while_streaming(srv: ServerProcess) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(base_url=srv.url, timeout=300) as client:
        starts = [asyncio.Event() for _ in range(STREAMS)]
        streams = [
            asyncio.create_task(_stream(client, prompt, started))
            for prompt, started in zip(prompts(STREAMS), starts, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 300)
        srv.track_tree()  # the workers of every actor are up now
        srv.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await _until_draining(client)
        refused = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503, refused.text
        assert refused.headers.get("Retry-After")
        assert refused.json()["error"]["code"] == "shutting_down"
        return list(await asyncio.gather(*streams)), signalled


async def _until_draining(client: httpx.AsyncClient) -> None:
    """/ready turns 503 "draining" once the CLI has told the router (a Ray call away)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = await client.get("/ready")
        if ready.status_code == 503 and ready.json().get("status") == "draining":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("/ready did not turn false within 60 s of SIGTERM")


def test_sigterm_drains_streams_and_leaves_nothing_running(server: ServerProcess) -> None:
    results, signalled = asyncio.run(_sigterm_while_streaming(server))
    for result in results:
        assert result["errors"] == [], f"{result}\n{server.output}"
        assert result["finish_reason"] == "length" and result["done"], result
        assert result["usage"]["completion_tokens"] == MAX_TOKENS, result
    try:
        code = server.proc.wait(DRAIN_TIMEOUT_S + 10 - (time.monotonic() - signalled))
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"still running {DRAIN_TIMEOUT_S + 10:g} s after SIGTERM:\n{server.output}"
        ) from None
    assert code == 0, server.output
    output = server.output
    assert "drained: every request finished" in output, output
    found = [marker for marker in _STACK_MARKERS if marker in output]
    assert not found, f"{found} in the output:\n{output}"
    # Only pdserve's own lines: Ray's and NIXL's go to log files without --verbose.
    foreign = [line for line in output.splitlines() if line and not line.startswith("pdserve")]
    assert not foreign, output
    assert server.left_running() == [], output

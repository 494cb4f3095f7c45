"""`pdserve bench` end to end through cluster.cli.main against the fake server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from tests.unit.bench.conftest import MODEL_ID, FakeOpenAI


def test_bench_end_to_end(
    fake: FakeOpenAI, base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    fake.reset(chunks=4, first_delay=0.02, delay=0.01, fail_every=5)
    argv = [
        "bench", "--base-url", base_url, "--num-prompts", "20", "--input-len", "32",
        "--output-len", "4", "--request-rate", "200", "--max-concurrency", "4",
        "--slo", "ttft=1000,tpot=500", "--json", str(tmp_path / "bench.json"),
        "--plot", str(tmp_path / "plots"), "--ignore-eos",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Successful requests:" in out and "Goodput (req/s):" in out
    assert f"Model:{MODEL_ID:>{62 - len('Model:')}}" in out
    # The server's own description heads the table, so it says what it measured.
    assert f"Instances:{'2P1D, KV over tcp':>{62 - len('Instances:')}}" in out
    assert "pdserve 9.9.9" in out and "/models/fake (cpu, float32)" in out
    assert fake.max_active <= 4
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["summary"]["completed"] == 16 and data["summary"]["failed"] == 4
    assert data["summary"]["errors"] == {"HTTP 500: injected failure": 4}
    assert data["config"]["model"] == MODEL_ID and data["config"]["max_concurrency"] == 4
    assert data["config"]["server"]["deployment"]["topology"] == "2P1D"
    assert len(data["requests"]) == 20
    assert all(body["model"] == MODEL_ID and body["ignore_eos"] for body in fake.bodies)
    for name in ("latency_cdf.png", "throughput.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 20_000


def test_chat_with_a_jsonl_file_and_tokenizer(
    fake: FakeOpenAI, base_url: str, tmp_path: Path, word_tokenizer_dir: Path
):
    path = tmp_path / "w.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}\n')
    argv = [
        "bench", "--base-url", base_url + "/v1", "--endpoint", "chat", "--dataset", "jsonl",
        "--dataset-path", str(path), "--num-prompts", "3", "--model", "explicit",
        "--tokenizer", str(word_tokenizer_dir), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    assert [b["model"] for b in fake.bodies] == ["explicit"] * 3
    assert all(b["max_tokens"] == 2 and "messages" in b for b in fake.bodies)


def test_all_failed_returns_1_and_says_why(
    fake: FakeOpenAI, base_url: str, capsys: pytest.CaptureFixture[str]
):
    fake.reset(fail_every=1)
    argv = ["bench", "--base-url", base_url, "--num-prompts", "3", "--no-progress"]
    assert main(argv) == 1
    assert "all 3 requests failed: HTTP 500: injected failure" in capsys.readouterr().err


def test_unreachable_server_returns_1(capsys: pytest.CaptureFixture[str]):
    argv = ["bench", "--base-url", "http://127.0.0.1:9", "--num-prompts", "2", "--no-progress"]
    assert main(argv) == 1
    assert "no request was sent" in capsys.readouterr().err


def test_invalid_options_return_2(capsys: pytest.CaptureFixture[str]):
    assert main(["bench", "--slo", "latency=5"]) == 2
    assert main(["bench", "--max-concurrency", "0"]) == 2
    assert main(["bench", "--request-rate", "0"]) == 2
    assert main(["bench", "--dataset", "jsonl"]) == 2
    assert "needs --dataset-path" in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_any_request(
    fake: FakeOpenAI,
    base_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def without_matplotlib(name: str, *args, **kwargs):
        return None if name == "matplotlib" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_matplotlib)
    fake.reset()
    argv = [
        "bench", "--base-url", base_url, "--num-prompts", "2", "--no-progress",
        "--plot", str(tmp_path / "plots"),
    ]  # fmt: skip
    assert main(argv) == 2
    assert "--plot needs matplotlib: pip install 'pdserve[bench]'" in capsys.readouterr().err
    assert fake.bodies == []  # nothing was sent

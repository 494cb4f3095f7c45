"""Workloads: requested lengths, token-id prompts, chat wrapping, JSONL parsing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.bench import BenchError
from cluster.bench.datasets import DatasetSpec, load_requests, sample_lengths
from engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(word_tokenizer_dir)


def test_lengths_stay_in_the_range_and_cover_it():
    lengths = sample_lengths(100, 0.5, 2000, np.random.default_rng(0))
    assert min(lengths) == 50 and max(lengths) == 150
    assert np.mean(lengths) == pytest.approx(100, rel=0.05)
    assert sample_lengths(100, 0.0, 5, np.random.default_rng(0)) == [100] * 5
    assert min(sample_lengths(1, 0.9, 100, np.random.default_rng(0))) == 1


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_range_ratio_is_checked(ratio: float):
    with pytest.raises(BenchError, match="range-ratio"):
        sample_lengths(10, ratio, 1, np.random.default_rng(0))


def test_random_with_tokenizer_sends_exact_token_ids(tokenizer: Tokenizer):
    spec = DatasetSpec("random", num_prompts=50, input_len=40, output_len=8, range_ratio=0.25)
    requests = load_requests(spec, tokenizer)
    assert len(requests) == 50
    bos_eos = {tokenizer.bos_token_id, *tokenizer.eos_token_ids}
    for r in requests:
        assert isinstance(r.prompt, list) and r.messages is None
        assert 30 <= len(r.prompt) <= 50 and r.prompt_len == len(r.prompt)
        assert 6 <= r.max_tokens <= 10
        assert bos_eos.isdisjoint(r.prompt)
    assert len({len(r.prompt) for r in requests}) > 5  # lengths really vary


def test_random_words_have_the_requested_token_count(tokenizer: Tokenizer):
    spec = DatasetSpec("random", num_prompts=20, input_len=64, range_ratio=0.5, seed=1)
    for r in load_requests(spec):
        assert isinstance(r.prompt, str)
        ids = tokenizer.encode(r.prompt, add_special_tokens=False)
        assert len(ids) == r.prompt_len and 32 <= len(ids) <= 96
        assert tokenizer.token_to_id("<unk>") not in ids


def test_same_seed_same_workload():
    spec = DatasetSpec("random", num_prompts=5, input_len=16, range_ratio=0.5, seed=9)
    assert load_requests(spec) == load_requests(spec)
    other = DatasetSpec("random", num_prompts=5, input_len=16, range_ratio=0.5, seed=10)
    assert load_requests(spec) != load_requests(other)


def test_chat_endpoint_wraps_prompts_in_a_user_message(tokenizer: Tokenizer):
    spec = DatasetSpec("random", endpoint="chat", num_prompts=3, input_len=12)
    for r in load_requests(spec, tokenizer):
        assert r.prompt is None and r.messages is not None
        (message,) = r.messages
        assert message["role"] == "user"
        assert len(tokenizer.encode(message["content"], add_special_tokens=False)) == 12


def _write_jsonl(path: Path, items: list[object]) -> str:
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n\n")
    return str(path)


def test_jsonl_prompts_messages_and_max_tokens(tmp_path: Path, tokenizer: Tokenizer):
    chat = [{"role": "user", "content": "hi"}]
    path = _write_jsonl(
        tmp_path / "w.jsonl",
        [{"prompt": "the water", "max_tokens": 3}, {"messages": chat}, {"prompt": "go"}],
    )
    requests = load_requests(
        DatasetSpec("jsonl", endpoint="chat", path=path, output_len=20), tokenizer
    )
    assert [r.max_tokens for r in requests] == [3, 20, 20]
    assert requests[0].messages == [{"role": "user", "content": "the water"}]
    assert requests[0].prompt_len == 2
    assert requests[1].messages == chat


def test_jsonl_num_prompts_cuts_or_repeats_the_file(tmp_path: Path):
    path = _write_jsonl(tmp_path / "w.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    prompts = [r.prompt for r in load_requests(DatasetSpec("jsonl", path=path, num_prompts=5))]
    assert prompts == ["a", "b", "a", "b", "a"]
    assert len(load_requests(DatasetSpec("jsonl", path=path, num_prompts=1))) == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"w.jsonl:2: not valid JSON"),
        ("[1, 2]", r"w.jsonl:2: expected a JSON object"),
        ('{"prompt": "x", "max_tokens": 0}', r"w.jsonl:2: max_tokens"),
        ('{"text": "x"}', r"w.jsonl:2: needs exactly one of"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"w.jsonl:2: 'messages' needs"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(BenchError, match=message):
        load_requests(DatasetSpec("jsonl", path=str(path)))


def test_jsonl_needs_an_existing_file(tmp_path: Path):
    with pytest.raises(BenchError, match="needs --dataset-path"):
        load_requests(DatasetSpec("jsonl"))
    with pytest.raises(BenchError, match="no such file"):
        load_requests(DatasetSpec("jsonl", path=str(tmp_path / "missing.jsonl")))

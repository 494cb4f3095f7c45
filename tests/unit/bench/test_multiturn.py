"""`--dataset multiturn`: conversations that grow turn by turn, against the fake server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cluster.bench import BenchError
from cluster.bench.client import OpenAIClient, build_payload
from cluster.bench.multiturn import MultiturnSpec, make_conversations, run_conversations
from cluster.bench.runner import LoadSpec
from cluster.cli import main
from tests.unit.bench.conftest import MODEL_ID, FakeOpenAI


def test_each_turn_extends_the_last_prompt_and_answer() -> None:
    spec = MultiturnSpec(users=2, turns=3, system_prompt_len=20, turn_len=5, endpoint="chat")
    first, second = make_conversations(spec)
    turn1 = first.next_request()
    assert [m["role"] for m in turn1.messages] == ["system", "user"]
    assert turn1.messages[0] == second.next_request().messages[0]  # the shared system prompt
    assert len(turn1.messages[0]["content"].split()) == 20
    first.add_answer(" an answer")
    turn2 = first.next_request()
    assert turn2.messages[: len(turn1.messages)] == turn1.messages
    assert turn2.messages[2] == {"role": "assistant", "content": " an answer"}
    assert len(turn2.messages[3]["content"].split()) == 5


def test_completions_transcript_keeps_its_prefix() -> None:
    spec = MultiturnSpec(users=1, turns=2, system_prompt_len=8, turn_len=3, endpoint="completions")
    (conversation,) = make_conversations(spec)
    turn1 = conversation.next_request()
    conversation.add_answer(" yes")
    turn2 = conversation.next_request()
    assert turn2.prompt.startswith(turn1.prompt + " yes\n\nUser: ")
    assert turn2.prompt.endswith("\nAssistant:") and turn2.messages is None


def test_own_vocabulary() -> None:
    spec = MultiturnSpec(users=1, turns=1, system_prompt_len=30, vocabulary=("w5", "w6"))
    (conversation,) = make_conversations(spec)
    assert set(conversation.next_request().messages[0]["content"].split()) <= {"w5", "w6"}


@pytest.mark.parametrize("field", ["users", "turns", "turn_len", "output_len"])
def test_bad_spec_names_the_option(field: str) -> None:
    with pytest.raises(BenchError, match=f"--{field.replace('_', '-')}"):
        make_conversations(MultiturnSpec(**{field: 0}))


def _run(base_url: str, spec: MultiturnSpec, load: LoadSpec):
    async def go():
        async with OpenAIClient(base_url) as client:

            async def send(index, request, origin):
                payload = build_payload(request, spec.endpoint, MODEL_ID, 0.0, False)
                return await client.send(index, spec.endpoint, payload, origin)

            return await run_conversations(spec, send, load)

    return asyncio.run(go())


def test_next_turn_waits_for_the_answer_and_carries_it(fake: FakeOpenAI, base_url: str) -> None:
    fake.reset(chunks=3, first_delay=0.01, delay=0.01)
    spec = MultiturnSpec(users=3, turns=3, system_prompt_len=10, turn_len=4, output_len=3)
    run = _run(base_url, spec, LoadSpec(progress=False))
    assert len(run.records) == 9 and all(r.success for r in run.records)
    assert all(r.text == " tok0 tok1 tok2" for r in run.records)
    assert sorted(zip(run.users, run.turns, strict=True)) == [
        (u, t) for u in range(3) for t in (1, 2, 3)
    ]
    # One request per user at a time: a turn is sent only after the previous answer ended.
    assert fake.max_active <= 3
    by_length = sorted(fake.bodies, key=lambda b: len(b["messages"]))
    assert [len(b["messages"]) for b in by_length] == [2] * 3 + [4] * 3 + [6] * 3
    for body in by_length[3:]:
        assert body["messages"][2] == {"role": "assistant", "content": " tok0 tok1 tok2"}
        assert body["max_tokens"] == 3


def test_concurrency_bounds_users_and_a_failure_ends_a_conversation(
    fake: FakeOpenAI, base_url: str
) -> None:
    fake.reset(chunks=2, first_delay=0.01, delay=0.01, fail_every=2)
    spec = MultiturnSpec(users=2, turns=4, system_prompt_len=4, turn_len=2, output_len=2)
    run = _run(base_url, spec, LoadSpec(max_concurrency=1, progress=False))
    assert fake.max_active == 1
    # Requests 1, 2, 3, ...: every second one fails, so each user gets one answer and one error.
    assert [
        (u, t, r.success) for u, t, r in zip(run.users, run.turns, run.records, strict=True)
    ] == [
        (0, 1, True),
        (0, 2, False),
        (1, 1, True),
        (1, 2, False),
    ]


def test_cli_prints_the_turn_table(
    fake: FakeOpenAI, base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.reset(chunks=2, first_delay=0.01, delay=0.01)
    argv = [
        "bench", "--base-url", base_url, "--endpoint", "chat", "--dataset", "multiturn",
        "--users", "2", "--turns", "3", "--system-prompt-len", "16", "--turn-len", "4",
        "--output-len", "2", "--slo", "ttft=1000", "--json", str(tmp_path / "b.json"),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Multi-turn" in out and "Successful requests:" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["3"][1:3] == ["2", "2"] and rows[">=3"][1:3] == ["2", "2"]
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["summary"]["completed"] == 6 and data["config"]["users"] == 2


def test_cli_rejects_bad_options_before_sending(
    fake: FakeOpenAI, base_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--base-url", base_url, "--dataset", "multiturn", "--turns", "0"]
    assert main(argv) == 2
    assert "--turns must be at least 1, got 0" in capsys.readouterr().err
    assert fake.bodies == []

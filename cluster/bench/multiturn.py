"""Multi-turn chat workload (`--dataset multiturn`): users hold conversations that share a system
prompt, as chat clients and agents do.

Each user sends turn 1 (the shared system prompt and a first user message); when the whole answer
has arrived, it sends the next turn with the conversation so far -- every earlier message and
answer -- plus a new user message. So each turn's prompt starts with the previous turn's prompt
and answer: the prefix a server can keep instead of recomputing or moving it. Users start on the
arrival schedule (Poisson at --request-rate, or all at once); --max-concurrency bounds the users
in flight. A user whose turn fails stops there (its later turns are not sent).

Lengths are in words of `datasets._WORDS` (about one token each; a script may pass its own
vocabulary); the report uses the server's token counts. `--endpoint chat` sends messages;
`completions` sends the conversation as text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from cluster.bench import BenchError
from cluster.bench.client import RequestRecord
from cluster.bench.datasets import _WORDS, BenchRequest, Endpoint
from cluster.bench.report import latency_stats_ms
from cluster.bench.runner import LoadSpec, RunResult, SendFn, _progress_bar, arrival_schedule

FROM_TURN = 3  # the turns after which a server that keeps conversations should be fastest


@dataclass(frozen=True)
class MultiturnSpec:
    users: int = 8
    turns: int = 4
    system_prompt_len: int = 1024  # words shared by every conversation
    turn_len: int = 128  # words of each new user message
    output_len: int = 128  # max_tokens of every turn
    endpoint: Endpoint = "chat"
    seed: int = 0
    vocabulary: tuple[str, ...] = ()  # words to draw from; empty: common English words

    def check(self) -> None:
        for name in ("users", "turns", "turn_len", "output_len"):
            if getattr(self, name) < 1:
                option = name.replace("_", "-")
                raise BenchError(f"--{option} must be at least 1, got {getattr(self, name)}")
        if self.system_prompt_len < 0:
            raise BenchError(f"--system-prompt-len must be >= 0, got {self.system_prompt_len}")


def spec_from_args(args) -> MultiturnSpec | None:
    """The checked spec of `pdserve bench --dataset multiturn` (argparse options of the same
    names); None for the other datasets."""
    if args.dataset != "multiturn":
        return None
    spec = MultiturnSpec(
        users=args.users,
        turns=args.turns,
        system_prompt_len=args.system_prompt_len,
        turn_len=args.turn_len,
        output_len=args.output_len,
        endpoint=args.endpoint,
        seed=args.seed,
    )
    spec.check()
    return spec


@dataclass
class ConversationRun(RunResult):
    """RunResult plus, for each record, its user and turn (1-based)."""

    users: list[int]
    turns: list[int]


class Conversation:
    """One user's messages so far; builds each turn's request the way a chat client does."""

    def __init__(self, system: str, user_messages: list[str], spec: MultiturnSpec) -> None:
        self._system = system
        self._pending = list(user_messages)
        self._spec = spec
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})

    def next_request(self) -> BenchRequest:
        self.messages.append({"role": "user", "content": self._pending.pop(0)})
        if self._spec.endpoint == "chat":
            return BenchRequest(None, [dict(m) for m in self.messages], self._spec.output_len)
        return BenchRequest(_as_text(self.messages), None, self._spec.output_len)

    def add_answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def _as_text(messages: list[dict[str, str]]) -> str:
    """A plain-text transcript ending where the assistant's next answer begins."""
    parts = []
    for message in messages:
        if message["role"] == "system":
            parts.append(message["content"])
        elif message["role"] == "user":
            parts.append(f"\n\nUser: {message['content']}\nAssistant:")
        else:
            # BPE answers start with their own space ("Assistant: Paris"); a word-level
            # tokenizer's do not, and "Assistant:Paris" would be one unknown word.
            answer = message["content"]
            parts.append(answer if answer[:1].isspace() else f" {answer}")
    return "".join(parts)


def make_conversations(spec: MultiturnSpec) -> list[Conversation]:
    spec.check()  # also here for callers other than the CLI
    rng = np.random.default_rng(spec.seed)

    vocabulary = spec.vocabulary or _WORDS

    def words(count: int) -> str:
        return " ".join(vocabulary[i] for i in rng.integers(0, len(vocabulary), size=count))

    system = words(spec.system_prompt_len)
    return [
        Conversation(system, [words(spec.turn_len) for _ in range(spec.turns)], spec)
        for _ in range(spec.users)
    ]


async def run_conversations(
    spec: MultiturnSpec,
    send: SendFn,
    load: LoadSpec,
    *,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> ConversationRun:
    """Run every conversation to its end; a user's turn waits for the previous answer."""
    conversations = make_conversations(spec)
    offsets = arrival_schedule(len(conversations), load.request_rate, load.seed)
    slots = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    bar = _progress_bar(spec.users * spec.turns, load.progress)
    done: list[tuple[int, int, RequestRecord]] = []
    origin = clock()

    async def converse(user: int, conversation: Conversation) -> None:
        for turn in range(1, spec.turns + 1):
            index = user * spec.turns + turn - 1
            record = await send(index, conversation.next_request(), origin)
            done.append((user, turn, record))
            bar.update(1)
            if not record.success:
                return
            conversation.add_answer(record.text)

    async def start(user: int, conversation: Conversation, offset: float) -> None:
        delay = origin + offset - clock()
        if delay > 0:
            await sleep(delay)
        if slots is None:
            await converse(user, conversation)
        else:
            async with slots:
                await converse(user, conversation)

    tasks = [
        asyncio.create_task(start(user, conversation, offset))
        for user, (conversation, offset) in enumerate(zip(conversations, offsets, strict=True))
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    done.sort(key=lambda entry: entry[2].index)
    return ConversationRun(
        [r for _, _, r in done], clock() - origin, [u for u, _, _ in done], [t for _, t, _ in done]
    )


def format_turns(run: ConversationRun, spec: MultiturnSpec) -> str:
    """TTFT and prompt length per turn, and TTFT from turn FROM_TURN on."""
    width = 62
    lines = [" Multi-turn ".center(width, "-")]
    header = ("turn", "sent", "ok", "prompt tok", "TTFT p50 ms", "p90 ms")
    lines.append("{:>4} {:>6} {:>6} {:>12} {:>14} {:>12}".format(*header))
    for turn in range(1, spec.turns + 1):
        records = [r for r, t in zip(run.records, run.turns, strict=True) if t == turn]
        lines.append(_turn_row(str(turn), records))
    later = [r for r, t in zip(run.records, run.turns, strict=True) if t >= FROM_TURN]
    lines.append(_turn_row(f">={FROM_TURN}", later))
    cut = spec.users * spec.turns - len(run.records)
    lines.append(f"{'Turns not sent (a user stopped after a failure):':<50}{cut:>12}")
    return "\n".join(lines)


def _turn_row(label: str, records: list[RequestRecord]) -> str:
    ok = [r for r in records if r.success]
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    prompt_mean = f"{np.mean(prompts):.0f}" if prompts else "-"
    ttft = latency_stats_ms([r.ttft_s for r in ok if r.ttft_s is not None])
    p50, p90 = (f"{ttft[k]:.2f}" if ttft[k] is not None else "-" for k in ("median", "p90"))
    return f"{label:>4} {len(records):>6} {len(ok):>6} {prompt_mean:>12} {p50:>14} {p90:>12}"

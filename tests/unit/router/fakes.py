"""Test doubles for the router: a byte-per-token tokenizer and fake instances on real zmq.

A fake PREFILL instance answers each request with its first token and forwards the request to
its fake DECODE peer, which streams the rest, one `TokenBatch` per step. Output token i is
`script[(i + seed) % len(script)]` (seed 0 when the request has none), so tests know the exact
text. When the request asks for logprobs, every token carries `fake_logprobs(...)`. Options make
a fake slow (a gate the test opens), late with the first token, shuffling (batches swapped and
repeated), failing, or refusing moved requests for lack of capacity.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.model_folders import write_byte_tokenizer
from cluster.router.dispatcher import InstanceEndpoint
from engine.config import Role
from engine.protocol.channels import Inbox, Sender
from engine.protocol.identity import InstanceId
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.protocol.tokens import TokenBatch, TokenItem
from engine.tokenizer import Tokenizer

SCRIPT = " the quick brown fox jumps over the lazy dog."
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_byte_tokenizer(folder: Path) -> Tokenizer:
    """One token per byte (a byte-level BPE without merges) plus <s>=0 and </s>=1; saved as a
    model folder and loaded the way the router loads a real one."""
    return Tokenizer.from_folder(write_byte_tokenizer(folder, CHAT_TEMPLATE))


def expected_text(num_tokens: int, seed: int = 0) -> str:
    """What the fakes generate in `num_tokens` tokens (ASCII: one token per character)."""
    shift = seed % len(SCRIPT)
    repeated = SCRIPT * ((num_tokens + shift) // len(SCRIPT) + 1)
    return repeated[shift : shift + num_tokens]


def fake_logprobs(script: list[int], token_id: int, index: int, top: int) -> list:
    """The logprobs a fake sends for output token `index`: the token itself is the likeliest,
    then other script tokens (distinct texts), each 1 nat less likely than the one before."""
    logprob = -0.125 * (index % 7 + 1)
    others = [t for t in dict.fromkeys(script) if t != token_id]
    alternatives = [[token_id, logprob]] + [
        [other, logprob - 1.0 - j] for j, other in enumerate(others)
    ]
    return [logprob, alternatives[:top]]


@dataclass
class _Active:
    msg: GenerateRequest
    next_index: int


class FakeInstance:
    """A fake instance on a thread; `received` and `aborts` record what reached it."""

    def __init__(
        self,
        name: str,
        role: Role,
        script: list[int],
        *,
        decode_peer: FakeInstance | None = None,
        step_s: float = 0.005,
        tokens_per_step: int = 1,
        shuffle: bool = False,
        gate: threading.Event | None = None,
        first_token_delay_s: float = 0.0,
        error: str | None = None,
        fail_suffix: str | None = None,
        error_reason: str = "error",
        fail_at: int | None = None,
        refuse_moved: int = 0,
        index: int = 0,
    ) -> None:
        self.label = name  # the test's own name for it
        self.name = InstanceId(role, index)
        self.role = role
        self._script = script
        self._peer = decode_peer
        self._step_s = step_s
        self._tokens_per_step = tokens_per_step
        self._shuffle = shuffle
        self._gate = gate
        self._first_token_delay_s = first_token_delay_s
        self._error = error
        self._error_reason = error_reason  # "overloaded" for a capacity refusal
        self._fail_suffix = fail_suffix  # requests whose id ends with it fail with `error`
        self._fail_at = fail_at  # a request's first run fails once it reaches this output index
        self._refuse_moved = refuse_moved  # moved attempts left to refuse for lack of capacity
        self.inbox = Inbox("127.0.0.1", accept=(GenerateRequest, AbortRequest), name=name)
        self.received: list[GenerateRequest] = []
        self.aborts: list[AbortRequest] = []
        self._changed = threading.Condition()
        self._parked: list[tuple[float, GenerateRequest]] = []  # (due time, request)
        self._active: dict[str, _Active] = {}
        self._held: tuple[str, TokenBatch] | None = None  # (router address, batch)
        self._last_batch: TokenBatch | None = None
        self._steps = 0
        self._senders: dict[str, Sender] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fake-{name}", daemon=True)

    @property
    def endpoint(self) -> dict:
        return {"name": self.name, "role": self.role.value, "inbox": self.inbox.address}

    def as_endpoint(self) -> InstanceEndpoint:
        return InstanceEndpoint.from_dict(self.endpoint)

    def start(self) -> FakeInstance:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sender in self._senders.values():
            sender.close()
        self.inbox.close()

    @property
    def active_ids(self) -> set[str]:
        return set(self._active)

    # -- waiting helpers for tests (condition variables, no sleeps) -----------------------
    def wait_received(self, count: int, timeout_s: float = 5.0) -> list[GenerateRequest]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.received) >= count, timeout_s), (
                f"{self.name}: {len(self.received)} requests, expected {count}"
            )
            return list(self.received)

    def wait_abort(self, request_id: str, timeout_s: float = 5.0) -> AbortRequest:
        def found() -> AbortRequest | None:
            return next((a for a in self.aborts if a.request_id == request_id), None)

        with self._changed:
            assert self._changed.wait_for(lambda: found() is not None, timeout_s), (
                f"{self.name}: no abort for {request_id}; got {self.aborts}"
            )
            return found()  # type: ignore[return-value]

    # -- the instance loop ----------------------------------------------------------------
    def _run(self) -> None:
        next_step = time.monotonic()
        while not self._stop.is_set():
            msg = self.inbox.recv(timeout_s=self._step_s)
            if msg is not None:
                self._on_message(msg)
            self._release_parked()
            if time.monotonic() >= next_step:
                self._step()
                next_step = time.monotonic() + self._step_s

    def _on_message(self, msg: GenerateRequest | AbortRequest) -> None:
        with self._changed:
            if isinstance(msg, AbortRequest):
                self.aborts.append(msg)
                self._active.pop(msg.request_id, None)
                self._parked = [
                    (due, m) for due, m in self._parked if m.request_id != msg.request_id
                ]
            else:
                self.received.append(msg)
                self._admit(msg)
            self._changed.notify_all()

    def _admit(self, msg: GenerateRequest) -> None:
        failing = self._fail_suffix is None or msg.request_id.endswith(self._fail_suffix)
        if msg.attempt and self._refuse_moved > 0:  # as P does when no D has free blocks
            self._refuse_moved -= 1
            error = "no decode instance could take the request (decode-0: no free blocks)"
            self._send(msg.reply_to, [TokenItem(msg.request_id, 0, [], "overloaded", error)])
        elif self._error is not None and failing:
            item = TokenItem(
                msg.request_id, 0, [], finish_reason=self._error_reason, error=self._error
            )
            self._send(msg.reply_to, [item])
        elif self.role == Role.PREFILL:
            self._parked.append((time.monotonic() + self._first_token_delay_s, msg))
        else:  # MIXED generates everything; DECODE continues after P's first token
            first = 1 if self.role == Role.DECODE else 0
            self._active[msg.request_id] = _Active(msg, first)

    def _release_parked(self) -> None:
        if not self._parked or (self._gate is not None and not self._gate.is_set()):
            return
        now = time.monotonic()
        due = [m for t, m in self._parked if t <= now]
        self._parked = [(t, m) for t, m in self._parked if t > now]
        for msg in due:
            max_tokens = msg.sampling.max_tokens
            if max_tokens > 1 and self._peer is not None:
                # Forward first: with a first-token delay, D's tokens overtake P's.
                self._send(self._peer.inbox.address, msg)
            finish = "length" if max_tokens == 1 else None
            tokens, logprobs = self._tokens(msg, 0, 1)
            item = TokenItem(
                msg.request_id,
                0,
                tokens,
                finish_reason=finish,
                num_prompt_tokens=len(msg.prompt_token_ids),
                logprobs=logprobs,
                # As a real P reports its D with the first token (the router aborts it there).
                decode_instance=self._peer.name if self._peer is not None and not finish else None,
            )
            self._send(msg.reply_to, [item])

    def _tokens(self, msg: GenerateRequest, start: int, end: int) -> tuple[list[int], list | None]:
        """Output tokens start..end-1 of a request, and their logprobs if it asked."""
        # Output token i depends on its position only, as a seeded model's does; a migrated
        # request's prompt already holds `prior_output_tokens` of the output.
        shift = (msg.sampling.seed or 0) + msg.sampling.prior_output_tokens
        tokens = [self._script[(i + shift) % len(self._script)] for i in range(start, end)]
        top = msg.sampling.logprobs
        if top is None:
            return tokens, None
        logprobs = [
            fake_logprobs(self._script, t, start + offset, top) for offset, t in enumerate(tokens)
        ]
        return tokens, logprobs

    def _step(self) -> None:
        by_router: dict[str, list[TokenItem]] = {}
        for request_id, active in list(self._active.items()):
            max_tokens = active.msg.sampling.max_tokens
            end = min(active.next_index + self._tokens_per_step, max_tokens)
            tokens, logprobs = self._tokens(active.msg, active.next_index, end)
            finish = "length" if end >= max_tokens else None
            first_run = not active.msg.sampling.prior_output_tokens
            failing = self._fail_at is not None and first_run and end > self._fail_at
            item = TokenItem(
                request_id,
                active.next_index,
                [] if failing else tokens,
                finish_reason="error" if failing else finish,
                error="KV transfer failed" if failing else None,
                num_prompt_tokens=len(active.msg.prompt_token_ids),
                logprobs=None if failing else logprobs,
            )
            finish = finish or ("error" if failing else None)
            by_router.setdefault(active.msg.reply_to, []).append(item)
            active.next_index = end
            if finish:
                del self._active[request_id]
        for address, items in by_router.items():
            self._publish(address, TokenBatch(self.name, items))
        if not by_router and self._held is not None:  # nothing left to overtake it
            self._send(*self._held)
            self._held = None

    def _publish(self, address: str, batch: TokenBatch) -> None:
        self._steps += 1
        if not self._shuffle:
            self._send(address, batch)
            return
        if self._held is not None:  # swap: this step's batch overtakes the held one
            self._send(address, batch)
            self._send(*self._held)
            self._held = None
        elif self._steps % 3 == 0:
            self._held = (address, batch)
        else:
            self._send(address, batch)
            if self._steps % 4 == 0 and self._last_batch is not None:
                self._send(address, self._last_batch)  # a duplicate
        self._last_batch = batch

    def _send(self, address: str, msg: TokenBatch | GenerateRequest | list[TokenItem]) -> None:
        if isinstance(msg, list):
            msg = TokenBatch(self.name, msg)
        sender = self._senders.get(address)
        if sender is None:
            sender = self._senders[address] = Sender(address)
        sender.send(msg)

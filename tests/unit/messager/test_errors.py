"""The cache messager's loop over real zmq inboxes: one request's failure (a handler that
raises, a malformed message, a backend whose poll raises) fails that request only -- D hears
KvComplete(ok=False), P TransferDone(ok=False) -- and every other request still completes."""

from __future__ import annotations

import time

import pytest

from cache_transfer.backend import TransferHandle, TransferState
from cache_transfer.factory import kv_agent_name
from cluster.messager.actor import CacheMessager
from cluster.messager.state import MessagerState
from engine.protocol.cache import (
    CacheTask,
    ChunkPlan,
    KvComplete,
    LayerReady,
    PrefillDone,
    StepPlan,
    TransferDone,
)
from engine.protocol.channels import Inbox, Sender
from engine.protocol.identity import MessagerId
from tests.unit.messager.test_state import D0, RecordingBackend

LAYERS = 2
HOST = "127.0.0.1"


class Rig:
    """A messager driven round by round, with P's and D's inboxes to read its reports."""

    def __init__(self, backend: RecordingBackend, drain_s: float = 30.0) -> None:
        self.backend = backend
        self.p_inbox = Inbox(HOST, accept=(TransferDone,))
        self.d_inbox = Inbox(HOST, accept=(KvComplete,))
        self.messager = CacheMessager(MessagerId(0), "unused", task_wait_s=5.0)
        state = MessagerState(backend, LAYERS, 4, kv_agent_name, 5.0, drain_s=drain_s)
        self.messager.open(state, HOST, self.p_inbox.address)
        self.to_messager = Sender(self.messager.inbox.address)

    def send(self, *msgs) -> None:
        for msg in msgs:
            self.to_messager.send(msg)

    def stream(self, rids: list[str], step: int = 0) -> None:
        """P's side of one prefill step that computes every prompt of `rids` whole."""
        self.send(StepPlan(step, [ChunkPlan(rid, 8, True) for rid in rids]))
        self.send(*(LayerReady(step, layer) for layer in range(LAYERS)))

    def reports(self, count: int, timeout_s: float = 20.0) -> tuple[dict, dict]:
        """Run rounds until `count` requests were reported to both P and D."""
        to_p: dict[str, TransferDone] = {}
        to_d: dict[str, KvComplete] = {}
        deadline = time.monotonic() + timeout_s
        while len(to_p) < count or len(to_d) < count:
            assert time.monotonic() < deadline, (to_p, to_d)
            self.backend.complete_all()
            self.messager.round()
            to_p.update((m.request_id, m) for m in self.p_inbox.drain())
            to_d.update((m.request_id, m) for m in self.d_inbox.drain())
        return to_p, to_d

    def close(self) -> None:
        self.to_messager.close()
        self.messager.inbox.close()
        self.messager.senders.close()
        self.p_inbox.close()
        self.d_inbox.close()


@pytest.fixture
def rig():
    made: list[Rig] = []

    def build(backend: RecordingBackend | None = None, drain_s: float = 30.0) -> Rig:
        made.append(Rig(backend or RecordingBackend(), drain_s))
        return made[-1]

    yield build
    for each in made:
        each.close()


def task(rid: str, d_inbox: str, src: int = 2, dst: int = 2) -> CacheTask:
    return CacheTask(rid, D0, d_inbox, list(range(src)), list(range(10, 10 + dst)), 8, 1e12)


def assert_outcomes(to_p: dict, to_d: dict, ok: set[str], failed: dict[str, str]) -> None:
    assert {rid for rid, m in to_p.items() if m.ok} == ok
    assert {rid for rid, m in to_d.items() if m.ok} == ok
    for rid, words in failed.items():
        assert not to_p[rid].ok and words in to_p[rid].error, to_p[rid]
        assert not to_d[rid].ok and words in to_d[rid].error, to_d[rid]


def test_a_handler_that_raises_fails_only_its_request(rig, monkeypatch) -> None:
    r = rig()
    real = r.messager.state.prefill_done

    def prefill_done(request_id: str, first_token_id: int, wall: float) -> None:
        if request_id == "bad":
            raise RuntimeError("injected bug")
        real(request_id, first_token_id, wall)

    monkeypatch.setattr(r.messager.state, "prefill_done", prefill_done)
    rids = ["a", "bad", "b"]
    r.send(*(task(rid, r.d_inbox.address) for rid in rids))
    r.stream(rids)
    r.send(*(PrefillDone(rid, 7) for rid in rids))
    to_p, to_d = r.reports(3)
    assert_outcomes(to_p, to_d, {"a", "b"}, {"bad": "injected bug"})
    assert to_d["a"].first_token_id == 7
    assert r.messager.state.counters["bad_messages"] == 1
    assert not r.messager.state.tasks
    assert sorted(h.id for h in r.backend.released) == sorted(h.id for h in r.backend.handles)


def test_malformed_messages_fail_only_their_request(rig) -> None:
    r = rig()
    r.send(task("a", r.d_inbox.address), task("short", r.d_inbox.address, src=2, dst=1))
    r.to_messager._socket.send(b"\x93garbage")  # not a message at all
    r.send(LayerReady(0, 99))  # a layer the model does not have
    r.send(task("a", r.d_inbox.address))  # a second task for a request id
    r.stream(["a", "short"])
    r.send(PrefillDone("a", 5), PrefillDone("short", 5))
    to_p, to_d = r.reports(2)
    # The duplicate task fails "a" (two tasks for one id cannot both be right).
    assert_outcomes(to_p, to_d, set(), {"short": "source blocks", "a": "second cache task"})
    r.send(task("c", r.d_inbox.address))  # the loop still serves
    r.stream(["c"], step=1)
    r.send(PrefillDone("c", 5))
    to_p, to_d = r.reports(1)
    assert_outcomes(to_p, to_d, {"c"}, {})
    assert r.messager.inbox.bad_frames == 1
    assert r.messager.state.counters["bad_messages"] == 2


class PollRaises(RecordingBackend):
    """Its poll raises for the writes of one request (the first `bad_writes` writes)."""

    def __init__(self, bad_writes: int) -> None:
        super().__init__()
        self.bad_writes = bad_writes

    def poll(self, handle: TransferHandle) -> TransferState:
        if self.handles.index(handle) < self.bad_writes:
            raise RuntimeError("injected poll failure")
        return handle.state

    def complete_all(self) -> None:
        for handle in self.handles[self.bad_writes :]:
            if handle.state is TransferState.PENDING:
                handle.state = TransferState.DONE


def test_a_backend_whose_poll_raises_for_one_request(rig) -> None:
    r = rig(PollRaises(bad_writes=LAYERS), drain_s=0.5)
    r.send(task("bad", r.d_inbox.address))
    r.stream(["bad"])  # its two writes (one per layer) are the ones whose poll raises
    r.send(*(task(rid, r.d_inbox.address) for rid in ("a", "b")))
    r.stream(["a", "b"], step=1)
    r.send(*(PrefillDone(rid, 3) for rid in ("bad", "a", "b")))
    to_p, to_d = r.reports(3)
    # The writes' state is unknown: "bad" is reported only after the drain deadline.
    assert_outcomes(to_p, to_d, {"a", "b"}, {"bad": "injected poll failure"})
    assert "did not drain" in to_p["bad"].error
    assert len(r.backend.released) == len(r.backend.handles) == 3 * LAYERS

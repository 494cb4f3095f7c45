"""Prepare workers against decode stand-ins speaking the real protocol over real zmq sockets."""

from __future__ import annotations

import queue
import time

import pytest

from cluster.instances.prepare_pool import Answer, Ask, PrepareWorker
from engine.protocol.channels import SenderPool
from engine.protocol.requests import AbortRequest
from engine.protocol.splitwise import DecodeTask
from engine.sampling_params import SamplingParams
from tests.unit.cluster.standins import FakeDecode


@pytest.fixture
def env():
    made: list = []

    def build(policy) -> tuple[FakeDecode, PrepareWorker, queue.Queue[Answer]]:
        answers: queue.Queue[Answer] = queue.Queue()
        decode = FakeDecode(0, policy)
        worker = PrepareWorker("127.0.0.1", answers.put, "prepare-0")
        worker.start()
        made.append((decode, worker))
        return decode, worker, answers

    yield build
    for decode, worker in made:
        worker.stop()
        decode.close()


def ask(worker: PrepareWorker, decode: FakeDecode, rid: str, timeout_s: float = 5.0) -> None:
    task = DecodeTask(rid, [1, 2, 3], SamplingParams(), [2], worker.inbox.address, "tcp://x:1")
    worker.submit(Ask(decode.name_, decode.inbox.address, task, timeout_s))


def test_acceptance_and_refusal_come_back(env) -> None:
    for policy, accepted in (("accept", True), ("refuse", False)):
        decode, worker, answers = env(policy)
        ask(worker, decode, "r1")
        answer = answers.get(timeout=10)
        assert answer.request_id == "r1" and answer.worker is worker
        assert answer.reply is not None and answer.reply.accepted is accepted
        assert not answer.late and not decode.cancels


def test_timeout_cancels_and_a_late_answer_is_reported(env) -> None:
    decode, worker, answers = env(0.5)  # answers after 0.5 s
    ask(worker, decode, "r1", timeout_s=0.1)
    answer = answers.get(timeout=10)
    assert answer.why == "timeout" and answer.reply is None
    late = answers.get(timeout=10)  # the worker is idle: it still reads its inbox
    assert late.late and late.request_id == "r1" and late.reply.accepted
    assert decode.cancels == ["r1"]  # sent at the timeout, after the task on one socket


def test_abort_stops_the_wait_and_cancels(env) -> None:
    decode, worker, answers = env("silent")
    ask(worker, decode, "r1", timeout_s=60.0)
    senders = SenderPool()
    senders.send(worker.inbox.address, AbortRequest("other", "not this one"))
    senders.send(worker.inbox.address, AbortRequest("r1", "client gone"))
    answer = answers.get(timeout=10)
    assert answer.why == "aborted"
    senders.close()
    deadline = time.monotonic() + 10
    while decode.cancels != ["r1"]:
        assert time.monotonic() < deadline, "no CancelDecode reached D"
        time.sleep(0.01)

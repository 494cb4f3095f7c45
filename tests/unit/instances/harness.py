"""Instance loops without Ray: real engines on a tiny random Llama, real zmq sockets on
127.0.0.1, the real cache messager and TCP transfer backend. The test thread drives each loop
one iteration at a time (`pump`), so a peer that is not pumped holds its answers: that is how
the race windows are reproduced deterministically."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from cluster.config import PdserveConfig
from cluster.instances.actor import build_role
from cluster.instances.loop import InstanceLoop
from cluster.messager.actor import CacheMessager
from engine.config import Role
from engine.protocol.cache_events import PrefixCacheEvents
from engine.protocol.channels import Inbox, SenderPool
from engine.protocol.identity import InstanceId, MessagerId
from engine.protocol.requests import AbortRequest, GenerateRequest
from engine.protocol.tokens import TokenBatch, TokenItem
from engine.sampling_params import SamplingParams
from tests.unit.engine.helpers import assert_nothing_leaked

HOST = "127.0.0.1"
ENGINE = {"scheduler": {"block_size": 4, "max_num_batched_tokens": 64}, "cache": {"num_blocks": 48}}


def make_config(model: Path, **sections) -> PdserveConfig:
    raw: dict = {
        "model": {"path": str(model), "device": "cpu", "dtype": "float32"},
        "prefill": {"engine": ENGINE, "allocation_timeout_s": 2.0, "prepare_threads": 2},
        "decode": {"engine": ENGINE},
        "mixed": {"engine": ENGINE},
        "transfer": {"backend": "tcp", "cache_task_timeout_s": 2.0},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return PdserveConfig.model_validate(raw)


def make_loop(role: Role, index: int, config: PdserveConfig) -> InstanceLoop:
    name = InstanceId(role, index)
    core, policy = build_role(name, config, HOST)
    return InstanceLoop(name, HOST, core, policy)


class Router:
    """The router's token inbox in miniature: collects items by request."""

    def __init__(self) -> None:
        # Instances also report their prefix cache to the routers they serve: not used here.
        self.inbox = Inbox(HOST, accept=(TokenBatch, PrefixCacheEvents))
        self.senders = SenderPool()
        self.items: dict[str, list[TokenItem]] = defaultdict(list)

    def collect(self) -> None:
        for batch in self.inbox.drain():
            for item in batch.items if isinstance(batch, TokenBatch) else []:
                self.items[item.request_id].append(item)

    def send(self, loop: InstanceLoop, rid: str, prompt: list[int], **params) -> None:
        sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": 6, **params})
        msg = GenerateRequest(rid, prompt, sampling, self.inbox.address, time.time())
        self.senders.send(loop.inbox.address, msg)

    def abort(self, loop: InstanceLoop, rid: str) -> None:
        self.senders.send(loop.inbox.address, AbortRequest(rid, "client gone"))

    def tokens(self, rid: str) -> list[int]:
        """The output in order (P's first token and D's tokens may come in any order)."""
        by_index: dict[int, int] = {}
        for item in self.items[rid]:
            for offset, token in enumerate(item.token_ids):
                by_index[item.first_index + offset] = token
        return [by_index[i] for i in sorted(by_index)]

    def finish(self, rid: str) -> TokenItem | None:
        return next((i for i in self.items[rid] if i.finish_reason), None)

    def close(self) -> None:
        self.inbox.close()
        self.senders.close()


def pump(*loops: InstanceLoop, until, router: Router | None = None, timeout_s: float = 60.0):
    """Iterate the loops (and collect tokens) until `until()` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        if router is not None:
            router.collect()
        if until():
            return
        assert time.monotonic() < deadline, "condition not reached"
        for loop in loops:
            loop.iterate(0.005)


def assert_all_free(loop: InstanceLoop) -> None:
    """Nothing held: no request, no client, no block (the scheduler's own invariants too)."""
    assert_nothing_leaked(loop.core.scheduler)
    assert not loop.clients, list(loop.clients)
    policy = loop.policy
    for attr in ("leases", "transfers", "preparing", "queued"):
        assert not getattr(policy, attr, None), (attr, getattr(policy, attr))


class PD:
    """One prefill loop, its cache messager (own thread) and one or more decode loops."""

    def __init__(self, config: PdserveConfig, decodes: int = 1) -> None:
        self.config = config
        self.decodes = [make_loop(Role.DECODE, i, config) for i in range(decodes)]
        self.prefill = make_loop(Role.PREFILL, 0, config)
        self.messager = self.start_messager(MessagerId(0))

    def start_messager(self, name: MessagerId) -> CacheMessager:
        backend = self.config.transfer.backend.value
        messager = CacheMessager(name, backend, self.config.transfer.cache_task_timeout_s)
        kv = self.prefill.policy.info()["kv_cache"]
        info = messager.setup(HOST, kv, self.prefill.inbox.address)
        messager.add_decode_peers([self.decode_info(d) for d in self.decodes])
        self.prefill.policy.connect(info["inbox"], [self.decode_info(d) for d in self.decodes])
        return messager

    @staticmethod
    def decode_info(loop: InstanceLoop) -> dict:
        return {"name": loop.name, "inbox": loop.inbox.address, **loop.policy.info()}

    @property
    def loops(self) -> list[InstanceLoop]:
        return [self.prefill, *self.decodes]

    def close(self) -> None:
        for loop in self.loops:
            loop.close()
        self.messager.shutdown()

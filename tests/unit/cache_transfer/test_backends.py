"""The transfer backends, for real: registered shared memory, two processes, real NIXL, TCP
and local (the source maps the target's shared store and copies).

The target (decode side) runs in a spawned child that attaches a cache this test process owns,
so the test can check the target's memory byte for byte once the writes polled DONE (DONE means
the bytes are in the target's memory: the messager's KvComplete relies on it).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from cache_transfer.backend import (
    TransferBackend,
    TransferError,
    TransferState,
    TransferTimeout,
    deadline_in,
)
from cache_transfer.layout import KVLayout, LayoutError
from cache_transfer.shared_kv import SharedKVCache

pytestmark = pytest.mark.timeout(45)

LAYOUT = KVLayout(num_layers=4, num_blocks=16, block_size=4, kv_heads=2, head_dim=8, itemsize=4)
PREFIX = f"pdkvt{os.getpid()}be"
HOST = "127.0.0.1"
BACKENDS = ["tcp", "nixl", "local"]
# (src layer, src blocks, dst layer, dst blocks): partly consecutive, never identical, and one
# plan that lands in a different layer.
PLAN = [
    (0, [0, 1, 2, 5, 6, 9], 0, [3, 4, 5, 10, 12, 13]),
    (2, [7, 8, 9, 10], 2, [0, 1, 2, 3]),
    (3, [15, 4], 3, [8, 9]),
    (1, [3, 11], 3, [14, 15]),
]


def make_backend(kind: str, name: str, shares: SharedKVCache | None = None) -> TransferBackend:
    """`shares`: the target's cache, which a local backend publishes for its source to map."""
    if kind == "local":
        from cache_transfer.factory import rank_kv_wire
        from cache_transfer.local_backend import LocalBackend

        backend = LocalBackend(name)
        if shares is not None:
            backend.share(rank_kv_wire([shares.handle()], [(0, LAYOUT.kv_heads)]))
        return backend
    if kind == "tcp":
        from cache_transfer.tcp_backend import TcpBackend

        return TcpBackend(name, host=HOST)
    from cache_transfer.nixl_backend import NixlBackend

    return NixlBackend(name)


def _leftovers() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(PREFIX)]


def _random_cache() -> SharedKVCache:
    cache = SharedKVCache.create(PREFIX, LAYOUT, "float32")
    rng = np.random.default_rng()
    for layer in range(LAYOUT.num_layers):
        view = cache.layer_bytes(layer)
        view[:] = rng.integers(0, 256, view.shape, dtype=np.uint8)
    return cache


def _run_target(kind: str, cache_handle: dict[str, Any], conn: Connection) -> None:
    """Child: attach the cache, publish the endpoint (as msgpack), serve until told to stop."""
    cache = SharedKVCache.attach(cache_handle)
    backend = make_backend(kind, "decode-0", shares=cache)
    try:
        backend.register(cache.regions())
        conn.send_bytes(msgpack.packb(backend.endpoint_info()))
        conn.poll(30)  # until the parent has checked memory
    finally:
        backend.close()
        cache.close()


class Target:
    """A target child process plus the pipe to it; always killed at teardown."""

    def __init__(self, kind: str, cache: SharedKVCache) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_run_target, args=(kind, cache.handle(), child_conn))
        self.process.start()

    def endpoint(self) -> dict[str, Any]:
        assert self.conn.poll(30), "target did not publish its endpoint"
        return msgpack.unpackb(self.conn.recv_bytes())

    def stop(self) -> None:
        if self.process.is_alive():
            self.conn.send("stop")
            self.process.join(3)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


@pytest.fixture
def caches() -> Iterator[tuple[SharedKVCache, SharedKVCache]]:
    src, dst = _random_cache(), _random_cache()
    yield src, dst
    src.close()
    dst.close()
    assert _leftovers() == []


@pytest.fixture
def targets() -> Iterator[list[Target]]:
    started: list[Target] = []
    yield started
    for target in started:
        target.stop()


@pytest.mark.parametrize("kind", BACKENDS)
def test_written_blocks_are_in_the_target_once_done_across_processes(
    kind: str, caches: tuple[SharedKVCache, SharedKVCache], targets: list[Target]
) -> None:
    src, dst = caches
    before = [dst.layer_bytes(layer).copy() for layer in range(LAYOUT.num_layers)]
    targets.append(target := Target(kind, dst))
    with make_backend(kind, "prefill-0") as source:
        source.register(src.regions())
        peer = source.connect(target.endpoint(), deadline_in(20))
        assert peer == "decode-0"
        handles = [source.write(peer, *plan) for plan in PLAN]
        assert [h.num_descs for h in handles] == [4, 1, 2, 2]
        deadline = deadline_in(20)
        assert [source.wait(h, deadline) for h in handles] == [TransferState.DONE] * len(PLAN)
        expected = before
        for src_layer, src_ids, dst_layer, dst_ids in PLAN:
            expected[dst_layer][dst_ids] = src.layer_bytes(src_layer)[src_ids]
        for layer in range(LAYOUT.num_layers):
            np.testing.assert_array_equal(dst.layer_bytes(layer), expected[layer])
        for handle in handles:
            source.release(handle)
        assert source.stats()["failed"] == 0


@pytest.mark.parametrize("kind", ["tcp", "nixl"])  # local: see the test after this one
def test_peer_gone_fails_within_deadline(
    kind: str, caches: tuple[SharedKVCache, SharedKVCache], targets: list[Target]
) -> None:
    src, dst = caches
    targets.append(target := Target(kind, dst))
    with make_backend(kind, "prefill-0") as source:
        source.register(src.regions())
        peer = source.connect(target.endpoint(), deadline_in(20))
        # A first write brings the connection up, so the loss is one of a live peer.
        first = source.write(peer, 0, [0, 1], 0, [2, 3])
        assert source.wait(first, deadline_in(20)) == TransferState.DONE
        target.process.kill()
        target.process.join(10)
        started = time.monotonic()
        outcomes = []
        for _ in range(3):  # the loss may be noticed by the first write or only a later one
            try:
                handle = source.write(peer, 0, [0, 1], 0, [2, 3])
                outcomes.append(source.wait(handle, deadline_in(8)))
                source.release(handle)
            except TransferError as exc:
                outcomes.append(exc)
            time.sleep(0.2)
        assert time.monotonic() - started < 20
        assert any(o == TransferState.FAILED or isinstance(o, TransferError) for o in outcomes)


def test_local_peer_gone_is_told_and_then_refused(
    caches: tuple[SharedKVCache, SharedKVCache], targets: list[Target]
) -> None:
    """Shared memory outlives its process, so a dead target is not seen in the copy: the cache
    messager hears of it (the supervisor's decode_down) and disconnects; writes then fail."""
    src, dst = caches
    targets.append(target := Target("local", dst))
    with make_backend("local", "prefill-0") as source:
        source.register(src.regions())
        peer = source.connect(target.endpoint(), deadline_in(20))
        assert source.poll(source.write(peer, 0, [0, 1], 0, [2, 3])) == TransferState.DONE
        target.process.kill()
        source.disconnect(peer)
        with pytest.raises(TransferError, match="unknown or lost peer"):
            source.write(peer, 0, [0, 1], 0, [2, 3])


def test_local_refuses_a_peer_on_another_machine(
    caches: tuple[SharedKVCache, SharedKVCache],
) -> None:
    src, dst = caches
    with (
        make_backend("local", "prefill-0") as source,
        make_backend("local", "decode-0", shares=dst) as target,
    ):
        source.register(src.regions())
        target.register(dst.regions())
        info = {**target.endpoint_info(), "machine": "elsewhere/0"}
        with pytest.raises(TransferError, match="another machine"):
            source.connect(info, deadline_in(5))
        with pytest.raises(TransferError, match="shares no KV stores"):
            source.connect({**target.endpoint_info(), "stores": None}, deadline_in(5))


# local: destinations are translated relative to the store it mapped, so a peer's addresses
# cannot point anywhere else (the copy lands where the block ids say).
@pytest.mark.parametrize("kind", ["tcp", "nixl"])
def test_destination_outside_registered_memory_fails(
    kind: str, caches: tuple[SharedKVCache, SharedKVCache]
) -> None:
    src, dst = caches
    before = dst.layer_bytes(0).copy()
    with make_backend(kind, "prefill-0") as source, make_backend(kind, "decode-0") as target:
        source.register(src.regions())
        target.register(dst.regions())
        info = target.endpoint_info()
        # A peer that lies about its addresses: every destination is past its registered cache.
        regions = info["ranks"][0]["regions"]
        regions["layer_addrs"] = [a + (1 << 30) for a in regions["layer_addrs"]]
        peer = source.connect(info, deadline_in(10))
        try:
            handle = source.write(peer, 0, [0, 1], 0, [0, 1])
            assert source.wait(handle, deadline_in(10)) == TransferState.FAILED
        except TransferError:
            pass
        # The target survives and keeps serving a correct peer.
        good = source.connect(target.endpoint_info(), deadline_in(10))
        handle = source.write(good, 0, [4], 0, [5])
        assert source.wait(handle, deadline_in(10)) == TransferState.DONE
    np.testing.assert_array_equal(dst.layer_bytes(0)[:5], before[:5])
    np.testing.assert_array_equal(dst.layer_bytes(0)[5], src.layer_bytes(0)[4])


@pytest.mark.parametrize("kind", BACKENDS)
def test_misuse_is_typed_and_close_releases_everything(
    kind: str, caches: tuple[SharedKVCache, SharedKVCache]
) -> None:
    src, dst = caches
    source, target = make_backend(kind, "prefill-0"), make_backend(kind, "decode-0", shares=dst)
    with pytest.raises(TransferError):
        source.endpoint_info()  # not registered yet
    source.register(src.regions())
    target.register(dst.regions())
    try:
        with pytest.raises(TransferError):
            source.write("nobody", 0, [0], 0, [0])
        with pytest.raises(TransferError):
            source.connect({**target.endpoint_info(), "version": 99}, deadline_in(5))
        peer = source.connect(target.endpoint_info(), deadline_in(10))
        with pytest.raises(LayoutError):
            source.write(peer, 0, [0, 1], 0, [LAYOUT.num_blocks])
        empty = source.write(peer, 0, [], 0, [])
        assert source.poll(empty) == TransferState.DONE
        pending = [source.write(peer, layer, [0, 1, 2], layer, [3, 4, 5]) for layer in range(4)]
    finally:
        source.close()
        target.close()
    assert all(h.state >= TransferState.DONE for h in pending)
    stats = source.stats()
    assert stats.get("live_handles", 0) == 0 and stats.get("pending", 0) == 0
    source.close()  # idempotent


def test_tcp_receiver_rejects_bad_frames_and_keeps_serving(
    caches: tuple[SharedKVCache, SharedKVCache],
) -> None:
    src, dst = caches
    before = dst.layer_bytes(1).copy()
    with make_backend("tcp", "prefill-0") as source, make_backend("tcp", "decode-0") as target:
        source.register(src.regions())
        target.register(dst.regions())
        info = target.endpoint_info()
        base = info["ranks"][0]["regions"]["layer_addrs"][1]
        good = {
            "v": 1,
            "op": "write",
            "session": info["session"],
            "src": "x",
            "xfer": 7,
            "layer": 1,
            "descs": [[base, LAYOUT.block_nbytes]],
        }
        block = b"\x01" * LAYOUT.block_nbytes
        bad_messages = [
            [b"\xc1garbage"],
            [msgpack.packb({**good, "v": 2}), block],
            [msgpack.packb({**good, "session": "stale"}), block],
            [msgpack.packb(good), block[:-4]],  # payload shorter than the descriptor
            [msgpack.packb({**good, "descs": [[base - 64, LAYOUT.block_nbytes]]}), block],
            [msgpack.packb({**good, "layer": 9}), block],
            [msgpack.packb(good)],  # payload missing
        ]
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(info["address"])
        try:
            for frames in bad_messages:
                raw.send_multipart(frames)
            nacks = [msgpack.unpackb(raw.recv()) for _ in range(6) if raw.poll(5000)]
        finally:
            raw.close()
        assert len(nacks) == 6 and not any(n["ok"] for n in nacks)
        assert target.stats()["rejected"] == len(bad_messages)
        np.testing.assert_array_equal(dst.layer_bytes(1), before)
        peer = source.connect(info, deadline_in(10))
        handle = source.write(peer, 1, [2], 1, [3])
        assert source.wait(handle, deadline_in(10)) == TransferState.DONE
        np.testing.assert_array_equal(dst.layer_bytes(1)[3], src.layer_bytes(1)[2])


def test_tcp_connect_to_nothing_times_out(caches: tuple[SharedKVCache, SharedKVCache]) -> None:
    src, _ = caches
    with make_backend("tcp", "prefill-0") as source:
        source.register(src.regions())
        info = source.endpoint_info()
        probe = zmq.Context.instance().socket(zmq.REP)
        port = probe.bind_to_random_port(f"tcp://{HOST}")
        probe.close(linger=0)  # a port on which nothing listens any more
        info.update(agent="decode-9", address=f"tcp://{HOST}:{port}")
        started = time.monotonic()
        with pytest.raises(TransferError):
            source.connect(info, deadline_in(1.0))
        assert time.monotonic() - started < 3


def test_tcp_pending_write_fails_when_connection_drops(
    caches: tuple[SharedKVCache, SharedKVCache],
) -> None:
    """A target that takes writes but never acks: timeout first, FAILED once it goes away."""
    src, dst = caches
    with make_backend("tcp", "prefill-0") as source, make_backend("tcp", "decode-0") as target:
        source.register(src.regions())
        target.register(dst.regions())
        info = target.endpoint_info()
        silent = zmq.Context.instance().socket(zmq.ROUTER)
        silent.setsockopt(zmq.LINGER, 0)
        port = silent.bind_to_random_port(f"tcp://{HOST}")
        info.update(agent="silent", address=f"tcp://{HOST}:{port}")
        try:
            answer = threading.Thread(target=_ack_hello, args=(silent,))
            answer.start()
            peer = source.connect(info, deadline_in(10))
            answer.join(10)
            handle = source.write(peer, 0, [0], 0, [1])
            with pytest.raises(TransferTimeout):
                source.wait(handle, deadline_in(0.3))
            assert source.poll(handle) == TransferState.PENDING
        finally:
            silent.close(linger=0)
        started = time.monotonic()
        assert source.wait(handle, deadline_in(10)) == TransferState.FAILED
        assert time.monotonic() - started < 5
        with pytest.raises(TransferError):
            source.write(peer, 0, [0], 0, [1])


def _ack_hello(router: zmq.Socket) -> None:
    if router.poll(10_000):
        identity, hello = router.recv_multipart()
        xfer = msgpack.unpackb(hello)["xfer"]
        router.send_multipart(
            [identity, msgpack.packb({"v": 1, "op": "ack", "xfer": xfer, "ok": True, "error": ""})]
        )


def test_tcp_slow_connect_does_not_block_writes_to_other_peers(
    caches: tuple[SharedKVCache, SharedKVCache],
) -> None:
    src, dst = caches
    with make_backend("tcp", "prefill-0") as source, make_backend("tcp", "decode-0") as target:
        source.register(src.regions())
        target.register(dst.regions())
        good = source.connect(target.endpoint_info(), deadline_in(10))
        mute = zmq.Context.instance().socket(zmq.ROUTER)  # accepts, never answers the hello
        mute.setsockopt(zmq.LINGER, 0)
        port = mute.bind_to_random_port(f"tcp://{HOST}")
        info = {**target.endpoint_info(), "agent": "mute", "address": f"tcp://{HOST}:{port}"}
        errors: list[BaseException] = []

        def slow_connect() -> None:
            try:
                source.connect(info, deadline_in(1.5))
            except TransferError as exc:
                errors.append(exc)

        connecting = threading.Thread(target=slow_connect)
        try:
            connecting.start()
            time.sleep(0.2)
            started = time.monotonic()
            handle = source.write(good, 2, [1, 2], 2, [6, 7])
            assert source.wait(handle, deadline_in(2)) == TransferState.DONE
            assert time.monotonic() - started < 1.5 and connecting.is_alive()
            connecting.join(10)
        finally:
            mute.close(linger=0)
        assert len(errors) == 1 and isinstance(errors[0], TransferTimeout)

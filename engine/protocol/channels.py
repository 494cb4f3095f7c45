"""All zmq socket code of pdserve: typed one-way channels carrying codec messages.

Every component has inboxes (PULL, bound to the node's cluster address on a random port) and
sends with PUSH sockets connected to other components' inboxes. One-way channels keep the
patterns simple: a reply is a message sent to the inbox address named in the request.
Sockets are not thread-safe, so each thread owns its senders (`SenderPool` is per thread).
Bad frames (wrong version, type or shape) are counted and dropped, never raised into a loop.
A `Mailbox` is the in-process side: other threads hand an actor's loop objects (answers,
closures) that it waits for in the same poll as its inbox.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from typing import Any

import zmq
import zmq.asyncio

from engine.protocol.codec import ProtocolError, decode, encode

log = logging.getLogger(__name__)

# Queue at most this many messages per peer before send() blocks (then times out): backpressure
# instead of unbounded memory when a peer stalls.
_HIGH_WATER_MARK = 10_000
_SEND_TIMEOUT_MS = 5_000


def node_ip_address() -> str:
    """The address other nodes reach this process on: Ray's view of the node when Ray runs
    (every actor binds and advertises this), else the host name's address. Never assumed."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return socket.gethostbyname(socket.gethostname())


def context() -> zmq.Context:
    return zmq.Context.instance()


class ChannelError(RuntimeError):
    """A send could not be completed within its deadline (the peer is gone or stalled)."""


class Inbox:
    """A PULL socket bound to `host` on a random port."""

    def __init__(self, host: str, accept: tuple[type, ...] | None = None, name: str = "") -> None:
        self._socket = context().socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, _HIGH_WATER_MARK)
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._accept = accept
        self.name = name or self.address
        self.bad_frames = 0

    @property
    def socket(self) -> zmq.Socket:
        """For a zmq.Poller that waits on this inbox and something else at once."""
        return self._socket

    def recv(self, timeout_s: float | None) -> Any | None:
        """The next valid message, or None when `timeout_s` passes first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ms = None if remaining is None else int(remaining * 1000)
            if not self._socket.poll(ms):
                return None
            msg = self._decode(self._socket.recv(copy=True))
            if msg is not None:
                return msg
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def drain(self) -> list[Any]:
        """Every message already queued, without waiting."""
        out = []
        while self._socket.poll(0):
            msg = self._decode(self._socket.recv(copy=True))
            if msg is not None:
                out.append(msg)
        return out

    def _decode(self, frame: bytes) -> Any | None:
        try:
            return decode(frame, self._accept)
        except ProtocolError as exc:
            self.bad_frames += 1
            log.warning("%s: dropped a bad frame: %s", self.name, exc)
            return None

    def close(self) -> None:
        self._socket.close(linger=0)


class Sender:
    """A PUSH socket connected to one inbox address."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._socket = context().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, _HIGH_WATER_MARK)
        self._socket.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
        self._socket.setsockopt(zmq.LINGER, 1000)
        self._socket.connect(address)

    def send(self, msg: Any) -> None:
        try:
            self._socket.send(encode(msg), copy=False)
        except zmq.Again as exc:
            raise ChannelError(f"send to {self.address} timed out") from exc

    def close(self) -> None:
        self._socket.close()


class SenderPool:
    """Senders by address for the calling thread (zmq sockets must stay on one thread)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[Sender] = []
        self._lock = threading.Lock()

    def get(self, address: str) -> Sender:
        senders = getattr(self._local, "senders", None)
        if senders is None:
            senders = self._local.senders = {}
        sender = senders.get(address)
        if sender is None:
            sender = senders[address] = Sender(address)
            with self._lock:
                self._all.append(sender)
        return sender

    def send(self, address: str, msg: Any) -> None:
        self.get(address).send(msg)

    def close(self) -> None:
        with self._lock:
            for sender in self._all:
                sender.close()
            self._all.clear()


class Mailbox:
    """An in-process channel beside an Inbox: a queue any thread may put into (Python objects,
    never encoded), with a file descriptor a zmq poller watches with the inbox (`wait`)."""

    def __init__(self, beside: Inbox | None = None) -> None:
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._poller = zmq.Poller()
        self._poller.register(self._read, zmq.POLLIN)
        if beside is not None:
            self._poller.register(beside.socket, zmq.POLLIN)

    def wait(self, timeout_s: float | None) -> None:
        """Block until this mailbox or the inbox beside it has something, at most `timeout_s`
        (None: no limit)."""
        self._poller.poll(None if timeout_s is None else int(timeout_s * 1000))

    def put(self, item: Any) -> None:
        self._items.put(item)
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the reader
            os.write(self._write, b"\0")

    def fileno(self) -> int:
        return self._read

    def take_all(self) -> list[Any]:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass
        items = []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._items.get_nowait())
        return items

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


class AsyncInbox:
    """Inbox for asyncio code (the router's event loop)."""

    def __init__(self, ctx: zmq.asyncio.Context, host: str, accept: tuple[type, ...]) -> None:
        self._socket = ctx.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, _HIGH_WATER_MARK)
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._accept = accept
        self.bad_frames = 0

    async def recv(self) -> Any:
        while True:
            frame = await self._socket.recv()
            try:
                return decode(frame, self._accept)
            except ProtocolError as exc:
                self.bad_frames += 1
                log.warning("router inbox: dropped a bad frame: %s", exc)

    def close(self) -> None:
        self._socket.close(linger=0)


class AsyncSender:
    def __init__(self, ctx: zmq.asyncio.Context, address: str) -> None:
        self.address = address
        self._socket = ctx.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, _HIGH_WATER_MARK)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)

    async def send(self, msg: Any, timeout_s: float = _SEND_TIMEOUT_MS / 1000) -> None:
        if not await self._socket.poll(int(timeout_s * 1000), zmq.POLLOUT):
            raise ChannelError(f"send to {self.address} timed out")
        await self._socket.send(encode(msg))

    def close(self) -> None:
        self._socket.close(linger=0)

"""TransferBackend over plain TCP with zmq frames, for hosts without NIXL.

Target: a receiver thread owns a ROUTER socket bound to ``tcp://<host>:<random port>``; the
caller passes the node's address (never a wildcard chosen here). Source: one DEALER socket per
peer. Every message is a msgpack header frame, optionally followed by payload frames:

    hello  {v, op, session, src, xfer}                       -> ack
    write  {v, op, session, src, xfer, layer, descs=[[addr, nbytes], ...]} + one payload frame
           per descriptor (a coalesced run of source blocks, sent zero-copy) -> ack
    ack    {v, op, xfer, ok, error}

The receiver (tcp_receiver.py) checks every message before it copies anything and answers a bad
one with a failed ack; an ack means the bytes were copied into the target's memory.

A lost connection (zmq heartbeat or TCP close) fails the peer's pending writes and discards what
was still queued for it, so nothing is sent after the failure is reported; ``connect`` again to
resume.
Source-side waits block in ``zmq.Poller`` for at most 10 ms at a time while holding the backend
lock (zmq sockets are single-threaded), so a writer in another thread waits at most that long.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from cache_transfer.backend import (
    TransferBackend,
    TransferError,
    TransferHandle,
    TransferState,
    TransferTimeout,
    endpoint_field,
    remaining,
)
from cache_transfer.layout import Desc
from cache_transfer.tcp_receiver import Receiver, bytes_at, pack
from cache_transfer.tp_layout import RankKV

logger = logging.getLogger(__name__)

_MAX_BLOCKING_POLL_MS = 10


@dataclass
class _PeerLink:
    """Source side: one connected target.

    Each link has its own zmq context: closing it can then ``term()`` just this context, which
    waits until zmq's I/O thread let go of every zero-copy source buffer, and a connect in
    progress never holds up ``close()`` of the backend.
    """

    session: str
    ctx: zmq.Context
    socket: zmq.Socket
    monitor: zmq.Socket
    pending: dict[int, TransferHandle] = field(default_factory=dict)


class TcpBackend(TransferBackend):
    """TransferBackend over zmq TCP; ``host`` is the address the receiver binds and publishes."""

    backend_name = "tcp"

    def __init__(
        self, agent_name: str, host: str, heartbeat_s: float = 1.0, heartbeat_timeout_s: float = 5.0
    ) -> None:
        super().__init__(agent_name)
        if not host:
            raise ValueError("host must be the node's address")
        self._host = host
        self._heartbeat_ms = int(heartbeat_s * 1000)
        self._heartbeat_timeout_ms = int(heartbeat_timeout_s * 1000)
        self._ctx: zmq.Context | None = None
        self._session = ""
        self._receiver: Receiver | None = None
        self._links: dict[str, _PeerLink] = {}

    # -- hooks ----------------------------------------------------------------------------

    def _register(self, ranks: list[RankKV]) -> None:
        regions = [rank.regions for rank in ranks]
        if any(each.device != "cpu" for each in regions):
            raise TransferError("the TCP backend moves host memory only")
        self._ctx = zmq.Context()
        self._session = secrets.token_hex(8)
        self._receiver = Receiver(self._ctx, self._host, self._session, regions)
        self._receiver.start()

    def _register_local(self, region: Desc, mem_type: str) -> None:
        # Sends read local memory straight from its address: nothing to register.
        if mem_type != "DRAM":
            raise TransferError("the TCP backend moves host memory only")

    def _endpoint_extra(self) -> dict[str, Any]:
        assert self._receiver is not None
        return {"address": self._receiver.address, "session": self._session}

    def _dial(self, peer: str, peer_info: dict[str, Any], deadline: float) -> _PeerLink:
        session = str(endpoint_field(peer_info, "session"))
        address = str(endpoint_field(peer_info, "address"))
        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Queue only to a live connection: a write to a vanished peer fails now, not at deadline.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.HEARTBEAT_IVL, self._heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, self._heartbeat_timeout_ms)
        link = _PeerLink(session, ctx, sock, sock.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        try:
            sock.connect(address)
            self._handshake(peer, link, deadline)
        except BaseException:
            _close_link(link)
            raise
        return link

    def _handshake(self, peer: str, link: _PeerLink, deadline: float) -> None:
        """Hello and its ack; uses only ``link``, so it runs without the backend lock."""
        hello_id = TransferHandle(peer=peer, nbytes=0, num_descs=0).id
        link.socket.setsockopt(zmq.SNDTIMEO, max(1, int(remaining(deadline) * 1000)))
        try:
            link.socket.send(
                pack(op="hello", session=link.session, src=self.agent_name, xfer=hello_id)
            )
        except zmq.ZMQError as exc:
            raise TransferTimeout(f"{peer}: no TCP connection before deadline ({exc})") from None
        poller = zmq.Poller()
        poller.register(link.socket, zmq.POLLIN)
        poller.register(link.monitor, zmq.POLLIN)
        while (left := remaining(deadline)) > 0:
            ready = dict(poller.poll(max(1, int(left * 1000))))
            if link.monitor in ready:
                raise TransferError(f"{peer}: connection lost during the handshake")
            if link.socket in ready:
                ack = _parse_ack(link.socket.recv())
                if ack is not None and ack[0] == hello_id:
                    if not ack[1]:
                        raise TransferError(f"{peer} refused the connection: {ack[2]}")
                    return
        raise TransferTimeout(f"{peer}: no answer to hello before deadline")

    def _abandon_dial(self, dialed: _PeerLink) -> None:
        _close_link(dialed)

    def _open_peer(self, peer: str, peer_info: dict[str, Any], dialed: _PeerLink) -> None:
        self._links[peer] = dialed

    def _start_write(
        self, handle: TransferHandle, src: np.ndarray, dst: np.ndarray, dst_layer: int
    ) -> None:
        link = self._links[handle.peer]
        self._pump(handle.peer, link, 0)  # learn of a lost connection before queueing more
        if self._links.get(handle.peer) is not link:
            raise TransferError(f"connection to {handle.peer} lost")
        header = pack(
            op="write",
            session=link.session,
            src=self.agent_name,
            xfer=handle.id,
            layer=dst_layer,
            descs=dst[:, :2].tolist(),
        )
        payload = [bytes_at(addr, nbytes) for addr, nbytes in src[:, :2].tolist()]
        try:
            link.socket.send_multipart([header, *payload], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            raise TransferError(f"{handle.peer} is not accepting writes: {exc}") from exc
        link.pending[handle.id] = handle

    def _close_peer(self, peer: str, reason: str) -> None:
        link = self._links.pop(peer)
        for handle in link.pending.values():
            handle.state, handle.error = TransferState.FAILED, reason
        self._counters["failed"] += len(link.pending)
        link.pending.clear()
        _close_link(link)

    def _close(self) -> None:
        assert self._ctx is not None and self._receiver is not None
        self._receiver.stop()
        if self._receiver.is_alive():
            # term() would wait forever for the receiver's sockets; leave the context to exit.
            logger.error("TCP KV receiver did not stop; zmq context left open")
        else:
            self._ctx.term()
        self._ctx = None
        self._receiver = None

    # -- transfers ------------------------------------------------------------------------

    def poll(self, handle: TransferHandle) -> TransferState:
        with self._lock:
            self._refresh(handle, 0)
            return handle.state

    def wait(self, handle: TransferHandle, deadline: float) -> TransferState:
        while True:
            with self._lock:
                self._refresh(handle, min(remaining(deadline) * 1000, _MAX_BLOCKING_POLL_MS))
                if handle.state >= TransferState.DONE:
                    return handle.state
            if remaining(deadline) <= 0:
                raise TransferTimeout(f"transfer {handle.id} to {handle.peer} still pending")

    def _refresh(self, handle: TransferHandle, timeout_ms: float) -> None:
        if handle.state != TransferState.PENDING:
            return
        link = self._links.get(handle.peer)
        if link is None or handle.id not in link.pending:
            # Its peer was dropped or replaced; _close_peer already failed it, this is a guard.
            handle.state, handle.error = TransferState.FAILED, "peer not connected"
            return
        self._pump(handle.peer, link, timeout_ms)

    def _pump(self, peer: str, link: _PeerLink, timeout_ms: float) -> None:
        """Apply acks and connection events that arrived, waiting up to ``timeout_ms`` for one."""
        if timeout_ms > 0:
            poller = zmq.Poller()
            poller.register(link.socket, zmq.POLLIN)
            poller.register(link.monitor, zmq.POLLIN)
            poller.poll(max(1, int(timeout_ms)))
        while link.socket.poll(0, zmq.POLLIN):
            self._apply_ack(peer, link, link.socket.recv())
        while link.monitor.poll(0, zmq.POLLIN):
            if recv_monitor_message(link.monitor)["event"] == zmq.EVENT_DISCONNECTED:
                self._drop_peer(peer, "connection to peer lost")
                return

    def _apply_ack(self, peer: str, link: _PeerLink, frame: bytes) -> None:
        ack = _parse_ack(frame)
        if ack is None:  # a garbled ack must not break the sender; its transfer times out
            logger.warning("undecodable ack from %s", peer)
            return
        xfer, ok, error = ack
        handle = link.pending.pop(xfer, None)
        if handle is not None:  # else released or timed out already
            handle.state = TransferState.DONE if ok else TransferState.FAILED
            handle.error = error
            self._counters["failed"] += not ok

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            link = self._links.get(handle.peer)
            if link is not None:
                link.pending.pop(handle.id, None)
            if handle.state == TransferState.PENDING:
                handle.state, handle.error = TransferState.FAILED, "released while pending"
            handle.released = True

    def stats(self) -> dict[str, int]:
        with self._lock:
            received = self._receiver.counters if self._receiver is not None else {}
            pending = sum(len(link.pending) for link in self._links.values())
            return {**self._counters, **received, "pending": pending}


def _parse_ack(frame: bytes) -> tuple[int, bool, str] | None:
    try:
        ack = msgpack.unpackb(frame)
        return int(ack["xfer"]), bool(ack["ok"]), str(ack.get("error", ""))
    except Exception:  # msgpack raises several unrelated types for garbage
        return None


def _close_link(link: _PeerLink) -> None:
    link.socket.disable_monitor()
    link.monitor.close(linger=0)
    link.socket.close(linger=0)  # discards queued writes: nothing is sent after FAILED
    # Waits until zmq's I/O thread let go of every zero-copy source buffer, so the caller may
    # unmap its cache as soon as close() returns.
    link.ctx.term()

"""The target side of the TCP transfer backend: a thread that copies incoming writes into
registered KV memory after checking every destination (see tcp_backend.py for the wire format).

The receiver checks version, session (a restarted target never accepts a stale sender's bytes)
and that every destination lies inside the named layer of its registered cache before copying
anything; a bad message is counted and, where it carries a transfer id, answered with a failed
ack. It never stops the receiver.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import msgpack
import numpy as np
import zmq

from cache_transfer.layout import KVRegions

logger = logging.getLogger(__name__)

TCP_WIRE_VERSION = 1


def bytes_at(addr: int, nbytes: int) -> np.ndarray:
    """A uint8 view of raw memory; the caller guarantees [addr, addr+nbytes) stays mapped."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr))


def pack(**fields: Any) -> bytes:
    return msgpack.packb({"v": TCP_WIRE_VERSION, **fields})


def _parse_header(body: list[zmq.Frame]) -> dict[str, Any]:
    if not body:
        raise _Rejected("empty message")
    try:
        header = msgpack.unpackb(body[0].bytes)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise _Rejected(f"undecodable header: {exc!r}") from None
    if not isinstance(header, dict):
        raise _Rejected("header is not a map")
    return header


class _Rejected(Exception):
    """A received message is malformed or not meant for this receiver."""


class Receiver(threading.Thread):
    """Target side: copies incoming writes into registered memory and acknowledges them."""

    def __init__(
        self,
        ctx: zmq.Context,
        host: str,
        session: str,
        regions: list[KVRegions],
    ) -> None:
        super().__init__(name=f"tcp-kv-receiver-{session[:6]}", daemon=True)
        self._session = session
        self._regions = regions
        self.counters = {
            "rejected": 0,
            "writes_received": 0,
            "bytes_received": 0,
        }
        self._router = ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        port = self._router.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        # close() wakes the blocking poll through this pair instead of a periodic timeout.
        wake_addr = f"inproc://tcp-kv-wake-{session}"
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake_addr)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.is_alive():
            self._wake_tx.send(b"")
            self.join(timeout_s)
        self._wake_tx.close(linger=0)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        try:
            while self._wake_rx not in dict(poller.poll()):
                frames = self._router.recv_multipart(copy=False)
                self._handle(frames)
        finally:
            self._router.close(linger=0)
            self._wake_rx.close(linger=0)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        identity, body = frames[0], frames[1:]
        xfer: int | None = None
        try:
            header = _parse_header(body)
            xfer = header["xfer"] if isinstance(header.get("xfer"), int) else None
            ack = self._dispatch(header, body[1:], xfer)
        # A receiver that dies strands every sender, so even unexpected errors only fail the
        # message at hand: count it, nack it when it names a transfer, keep serving.
        except Exception as exc:
            self.counters["rejected"] += 1
            if isinstance(exc, _Rejected):
                logger.warning("rejected KV message: %s", exc)
            else:
                logger.exception("unexpected error handling a KV message")
            ack = None if xfer is None else pack(op="ack", xfer=xfer, ok=False, error=str(exc))
        if ack is not None:
            self._router.send_multipart([identity, ack])

    def _dispatch(
        self, header: dict[str, Any], payload: list[zmq.Frame], xfer: int | None
    ) -> bytes | None:
        if header.get("v") != TCP_WIRE_VERSION:
            raise _Rejected(f"wire version {header.get('v')!r}")
        if header.get("session") != self._session:
            raise _Rejected("message for another session of this address")
        op = header.get("op")
        if op == "write":
            self._copy_in(header, payload, xfer)
        elif op != "hello":
            raise _Rejected(f"unexpected op {op!r}")
        return pack(op="ack", xfer=xfer, ok=True, error="")

    def _copy_in(self, header: dict[str, Any], payload: list[zmq.Frame], xfer: int | None) -> None:
        layer, descs = header.get("layer"), header.get("descs")
        if not isinstance(layer, int) or not isinstance(descs, list) or xfer is None:
            raise _Rejected("write header lacks layer, descs or xfer")
        if len(descs) != len(payload):
            raise _Rejected(f"{len(descs)} descriptors but {len(payload)} payload frames")
        targets: list[tuple[int, int]] = []
        for desc, frame in zip(descs, payload, strict=True):
            if not (
                isinstance(desc, list) and len(desc) == 2 and all(isinstance(x, int) for x in desc)
            ):
                raise _Rejected(f"bad descriptor {desc!r}")
            addr, nbytes = desc
            inside = any(each.contains(layer, addr, nbytes) for each in self._regions)
            if nbytes != len(frame) or not inside:
                raise _Rejected(f"descriptor {desc} is not {len(frame)} bytes in layer {layer}")
            targets.append((addr, nbytes))
        # Everything was checked first, so a rejected write leaves the cache untouched.
        for (addr, nbytes), frame in zip(targets, payload, strict=True):
            bytes_at(addr, nbytes)[:] = np.frombuffer(frame.buffer, dtype=np.uint8)
        self.counters["writes_received"] += 1
        self.counters["bytes_received"] += sum(n for _, n in targets)

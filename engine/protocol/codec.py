"""Versioned msgpack encoding of message dataclasses. Never pickle on the network.

A message is a dataclass registered with `@message(type_id)`. On the wire it is the msgpack array
`[PROTOCOL_VERSION, type_id, field values...]`; fields are msgpack-native values (ints, floats,
str, bytes, lists, dicts, None) or nested registered messages. Decoding checks the version, the
type id and the field count, and raises `ProtocolError` instead of crashing on bad input.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import msgpack

# 2: TokenItem.logprobs, .decode_instance; 3: KvComplete stamps; 4: prefix-cache keys are
# 32-byte SHA-256 digests (PrefixCacheEvents), SamplingParams.cache_salt
PROTOCOL_VERSION = 4
_EXT_NESTED = 1

_BY_ID: dict[int, type] = {}
_ID_OF: dict[type, int] = {}
T = TypeVar("T")


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def message(type_id: int):
    """Register a dataclass as a wire message with a unique numeric type id."""

    def register(cls: type[T]) -> type[T]:
        assert dataclasses.is_dataclass(cls), cls
        assert type_id not in _BY_ID, f"type id {type_id} used by {_BY_ID.get(type_id)}"
        _BY_ID[type_id] = cls
        _ID_OF[cls] = type_id
        cls._wire_fields = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[attr-defined]
        hints = typing.get_type_hints(cls)
        cls._wire_checks = tuple(_runtime_types(hints[f]) for f in cls._wire_fields)  # type: ignore[attr-defined]
        return cls

    return register


def _runtime_types(hint: Any) -> tuple[type, ...]:
    """The isinstance() check for a field annotation (outer types only: list[int] -> list)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _runtime_types(arg))
    if hint is type(None) or hint is None:
        return (type(None),)
    if hint is float:
        return (float, int)
    if hint is Any:
        return (object,)
    if origin in (list, tuple):
        return (list, tuple)
    return (origin or hint,)


def _to_wire(msg: Any) -> list:
    cls = type(msg)
    if cls not in _ID_OF:
        raise ProtocolError(f"{cls.__name__} is not a registered message")
    return [PROTOCOL_VERSION, _ID_OF[cls], *(getattr(msg, f) for f in cls._wire_fields)]


def _default(obj: Any) -> Any:
    if type(obj) in _ID_OF:
        return msgpack.ExtType(_EXT_NESTED, encode(obj))
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _EXT_NESTED:
        raise ProtocolError(f"unknown msgpack extension {code}")
    return decode(data)


def encode(msg: Any) -> bytes:
    return msgpack.packb(_to_wire(msg), default=_default, use_bin_type=True)


def decode(frame: bytes, expected: type[T] | tuple[type, ...] | None = None) -> T:
    """Decode one frame; `expected` restricts which message types this channel accepts."""
    try:
        wire = msgpack.unpackb(frame, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable frame: {exc}") from exc
    if not isinstance(wire, list) or len(wire) < 2:
        raise ProtocolError("frame is not a message array")
    version, type_id, *values = wire
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    cls = _BY_ID.get(type_id) if isinstance(type_id, int) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_id!r}")
    if expected is not None and not issubclass(cls, expected):
        raise ProtocolError(f"unexpected message {cls.__name__} on this channel")
    fields = cls._wire_fields
    if len(values) != len(fields):
        raise ProtocolError(f"{cls.__name__}: {len(values)} fields, expected {len(fields)}")
    for name, value, allowed in zip(fields, values, cls._wire_checks, strict=True):
        if not isinstance(value, allowed):
            raise ProtocolError(f"{cls.__name__}.{name}: unexpected {type(value).__name__}")
    try:
        return cls(**dict(zip(fields, values, strict=True)))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{cls.__name__}: {exc}") from exc

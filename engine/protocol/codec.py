"""Versioned msgpack encoding of typed records. Never pickle on the network.

A message is a dataclass registered with a numeric type id in `engine.protocol.registry` (the one
table of every id). On the wire it is the msgpack array `[PROTOCOL_VERSION, type_id, field
values...]`; a field holds msgpack-native values (int, float, str, bytes, bool, None, lists),
an enum (sent as its value) or another registered record (sent nested, as a msgpack extension).
Decoding checks the version, the type id, the field count and every field's type all the way
down (`list[ChunkPlan]` checks each element), and raises `ProtocolError` on bad input instead of
crashing the loop that reads it.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

# 2: TokenItem.logprobs, .decode_instance; 3: KvComplete stamps; 4: prefix-cache keys are
# 32-byte SHA-256 digests (PrefixCacheEvents), SamplingParams.cache_salt; 5: one id table, typed
# records (SamplingParams, Timings, ChunkPlan, InstanceId), GenerateRequest.attempt.
# 6: cache-aware routing (GenerateRequest.decode_hint/.reuse_decode_prefix,
# DecodeTask.reuse_prefix, DecodeAllocation.cached_blocks, CacheTask.skip_blocks).
PROTOCOL_VERSION = 6
_EXT_NESTED = 1

_BY_ID: dict[int, type] = {}
_ID_OF: dict[type, int] = {}
T = TypeVar("T")
_Check = Callable[[Any], Any]  # returns the (possibly converted) value or raises _Mismatch


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


class _Mismatch(Exception):
    pass


def register(cls: type, type_id: int) -> None:
    """Make dataclass `cls` a wire record with id `type_id` (called by the registry only)."""
    assert dataclasses.is_dataclass(cls), cls
    assert type_id not in _BY_ID, f"type id {type_id} used by {_BY_ID.get(type_id)}"
    assert cls not in _ID_OF, f"{cls.__name__} registered twice"
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))
    cls._wire_fields = names  # type: ignore[attr-defined]
    cls._wire_checks = tuple(_checker(hints[n]) for n in names)  # type: ignore[attr-defined]
    _BY_ID[type_id] = cls
    _ID_OF[cls] = type_id


def registered_types() -> dict[int, type]:
    return dict(_BY_ID)


def _checker(hint: Any) -> _Check:
    """A function that validates (and converts enums in) a decoded value of type `hint`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_checker(arg) for arg in typing.get_args(hint)]
        return lambda value: _first_match(options, value)
    if hint is Any:
        return lambda value: value
    if hint is type(None) or hint is None:
        return _isinstance(type(None))
    if hint is float:
        return lambda value: float(_isinstance(int, float)(value))
    if hint is int:
        return _isinstance(int)
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)  # list[T] or tuple[T, ...]: every element is a T
        item = _checker(args[0]) if args else None
        return lambda value: _check_list(value, item)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return lambda value: _to_enum(hint, value)
    return _isinstance(origin or hint)


def _isinstance(*allowed: type) -> _Check:
    def check(value: Any) -> Any:
        if not isinstance(value, allowed):
            raise _Mismatch(f"unexpected {type(value).__name__}")
        return value

    return check


def _first_match(options: list[_Check], value: Any) -> Any:
    for option in options:
        try:
            return option(value)
        except _Mismatch:
            continue
    raise _Mismatch(f"unexpected {type(value).__name__}")


def _check_list(value: Any, item: _Check | None) -> list:
    if not isinstance(value, (list, tuple)):
        raise _Mismatch(f"unexpected {type(value).__name__}")
    return list(value) if item is None else [item(v) for v in value]


def _to_enum(cls: type[enum.Enum], value: Any) -> enum.Enum:
    try:
        return cls(value)
    except ValueError:
        raise _Mismatch(f"{value!r} is not a {cls.__name__}") from None


def _to_wire(msg: Any) -> list:
    cls = type(msg)
    if cls not in _ID_OF:
        raise ProtocolError(f"{cls.__name__} is not a registered message")
    return [PROTOCOL_VERSION, _ID_OF[cls], *(getattr(msg, f) for f in cls._wire_fields)]


def _default(obj: Any) -> Any:
    if type(obj) in _ID_OF:
        return msgpack.ExtType(_EXT_NESTED, encode(obj))
    if isinstance(obj, enum.Enum):
        return obj.value
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
    kwargs = {}
    for name, value, check in zip(fields, values, cls._wire_checks, strict=True):
        try:
            kwargs[name] = check(value)
        except _Mismatch as exc:
            raise ProtocolError(f"{cls.__name__}.{name}: {exc}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a record's own validation (e.g. SamplingParams)
        raise ProtocolError(f"{cls.__name__}: {exc}") from exc

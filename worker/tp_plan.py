"""The step plan the driver rank sends every other rank of its instance, once per step.

A plan is the step's SchedulerOutput (plain data from engine/batch.py) in msgpack, or a stop.
Every rank runs the same plan on its shard, so the ranks' collectives line up without any
per-layer message between them. Versioned like the wire protocol; never pickle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from engine.batch import ScheduledChunk, SchedulerOutput
from engine.sampling_params import SamplingParams

PLAN_VERSION = 1
_STEP = 1
_STOP = 2
_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


class PlanError(ValueError):
    """A frame that is not a plan of this version."""


def encode_step(sched: SchedulerOutput) -> bytes:
    chunks = [_chunk_to_wire(c) for c in sched.chunks]
    return msgpack.packb([PLAN_VERSION, _STEP, sched.step_id, chunks, sched.released_request_ids])


def encode_stop() -> bytes:
    return msgpack.packb([PLAN_VERSION, _STOP])


def decode_plan(frame: bytes) -> SchedulerOutput | None:
    """The step to run, or None for a stop."""
    try:
        fields = msgpack.unpackb(frame)
        version, kind = fields[0], fields[1]
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as e:
        raise PlanError(f"unreadable plan: {e}") from None
    if version != PLAN_VERSION:
        raise PlanError(f"plan version {version}, expected {PLAN_VERSION}")
    if kind == _STOP:
        return None
    if kind != _STEP or len(fields) != 5:
        raise PlanError(f"unknown plan kind {kind} with {len(fields)} fields")
    _, _, step_id, chunks, released = fields
    return SchedulerOutput(step_id, [_chunk_from_wire(c) for c in chunks], released)


def _chunk_to_wire(c: ScheduledChunk) -> list[Any]:
    params = [getattr(c.sampling_params, name) for name in _PARAM_FIELDS]
    return [
        c.request_id,
        c.token_ids,
        c.start_pos,
        c.block_ids,
        c.sample,
        params,
        c.num_generated,
        c.output_token_ids,
    ]


def _chunk_from_wire(wire: list[Any]) -> ScheduledChunk:
    rid, token_ids, start_pos, block_ids, sample, params, num_generated, output = wire
    return ScheduledChunk(
        request_id=rid,
        token_ids=token_ids,
        start_pos=start_pos,
        block_ids=block_ids,
        sample=sample,
        sampling_params=SamplingParams(**dict(zip(_PARAM_FIELDS, params, strict=True))),
        num_generated=num_generated,
        output_token_ids=output,
    )

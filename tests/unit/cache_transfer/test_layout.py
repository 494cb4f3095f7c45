"""Layout descriptors: coalescing, src/dst pairing, validation and wire round trips."""

from __future__ import annotations

import msgpack
import pytest

from cache_transfer.layout import (
    KVLayout,
    KVRegions,
    LayoutError,
    block_runs,
    paired_block_descs,
    paired_runs,
)

pytestmark = pytest.mark.timeout(10)

LAYOUT = KVLayout(num_layers=3, num_blocks=20, block_size=16, kv_heads=2, head_dim=8, itemsize=4)
BLOCK = 2 * 16 * 2 * 8 * 4


def _regions(base: int = 1 << 20, layout: KVLayout = LAYOUT) -> KVRegions:
    return KVRegions(layout, tuple(base + i * 10 * layout.layer_nbytes for i in range(3)))


def test_sizes() -> None:
    assert LAYOUT.block_nbytes == BLOCK
    assert LAYOUT.layer_nbytes == 20 * BLOCK
    assert LAYOUT.layer_shape == (20, 2, 16, 2, 8)


@pytest.mark.parametrize(
    ("ids", "runs"),
    [
        ([], []),
        ([4], [(4, 1)]),
        ([1, 2, 3, 7, 8, 2], [(1, 3), (7, 2), (2, 1)]),
        ([5, 4, 3], [(5, 1), (4, 1), (3, 1)]),
    ],
)
def test_block_runs(ids: list[int], runs: list[tuple[int, int]]) -> None:
    assert block_runs(ids) == runs


def test_paired_runs_break_when_either_side_breaks() -> None:
    src = [0, 1, 2, 3, 4, 8, 9]
    dst = [5, 6, 9, 10, 11, 12, 13]
    assert paired_runs(src, dst) == [(0, 5, 2), (2, 9, 3), (8, 12, 2)]
    assert paired_runs([], []) == []
    with pytest.raises(LayoutError):
        paired_runs([1, 2], [1])


def test_block_descs_coalesce_consecutive_ids() -> None:
    regions = _regions()
    base = regions.layer_addrs[1]
    assert regions.block_descs(1, [3, 4, 5, 9]) == [
        (base + 3 * BLOCK, 3 * BLOCK, 0),
        (base + 9 * BLOCK, BLOCK, 0),
    ]
    assert regions.layer_desc(2) == (regions.layer_addrs[2], LAYOUT.layer_nbytes, 0)


def test_paired_block_descs_match_lengths_and_order() -> None:
    src, dst = _regions(1 << 20), _regions(1 << 30)
    src_descs, dst_descs = paired_block_descs(src, 0, [0, 1, 2, 6], dst, 2, [7, 8, 12, 13])
    assert [d[1] for d in src_descs] == [d[1] for d in dst_descs] == [2 * BLOCK, BLOCK, BLOCK]
    assert src_descs[0][0] == src.layer_addrs[0]
    assert dst_descs[1][0] == dst.layer_addrs[2] + 12 * BLOCK


@pytest.mark.parametrize(
    ("src_ids", "dst_ids"),
    [([0, 1], [2]), ([0, 20], [1, 2]), ([0, 1], [3, 3]), ([-1], [0])],
)
def test_invalid_block_ids_rejected(src_ids: list[int], dst_ids: list[int]) -> None:
    with pytest.raises(LayoutError):
        paired_block_descs(_regions(), 0, src_ids, _regions(1 << 30), 0, dst_ids)


def test_incompatible_geometry_and_bad_layer_rejected() -> None:
    other = KVLayout(3, 20, 16, 4, 8, 4)
    with pytest.raises(LayoutError):
        paired_block_descs(_regions(), 0, [0], _regions(layout=other), 0, [0])
    with pytest.raises(LayoutError):
        _regions().block_descs(3, [0])
    with pytest.raises(LayoutError):
        KVLayout(3, 0, 16, 2, 8, 4)
    with pytest.raises(LayoutError):
        KVRegions(LAYOUT, (1, 2))


def test_contains_checks_layer_bounds() -> None:
    regions = _regions()
    base = regions.layer_addrs[1]
    assert regions.contains(1, base, LAYOUT.layer_nbytes)
    assert not regions.contains(1, base + BLOCK, LAYOUT.layer_nbytes)
    assert not regions.contains(0, base, BLOCK)
    assert not regions.contains(7, base, BLOCK)


def test_wire_round_trip_through_msgpack() -> None:
    regions = _regions()
    wire = msgpack.unpackb(msgpack.packb(regions.to_wire()))
    assert wire["version"] == 1
    assert KVRegions.from_wire(wire) == regions
    assert KVLayout.from_wire(LAYOUT.to_wire()) == LAYOUT


@pytest.mark.parametrize("mutate", ["version", "missing", "device"])
def test_bad_wire_rejected(mutate: str) -> None:
    wire = _regions().to_wire()
    if mutate == "version":
        wire["version"] = 99
    elif mutate == "missing":
        del wire["layer_addrs"]
    else:
        wire["device"] = "tpu"
    with pytest.raises(LayoutError):
        KVRegions.from_wire(wire)

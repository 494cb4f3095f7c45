"""The engine processes' memory bounds: oneDNN's per-shape caches and malloc_trim when idle."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from worker import malloc_trim
from worker.malloc_trim import MallocTrimmer
from worker.models.linear import _CAPACITY_VARIABLES, bound_onednn_caches

_REPO = Path(__file__).resolve().parents[3]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_trims_when_idle_at_most_every_idle_interval() -> None:
    clock, calls = FakeClock(), []
    trimmer = MallocTrimmer(10.0, 60.0, clock=clock, trim=lambda pad: calls.append(pad) or 1)
    assert not trimmer.maybe_trim(idle=True)  # just started
    clock.now = 10.0
    assert trimmer.maybe_trim(idle=True)
    clock.now = 15.0
    assert not trimmer.maybe_trim(idle=True)
    assert calls == [0] and trimmer.trims == 1


def test_trims_a_busy_engine_only_after_the_busy_interval() -> None:
    clock, calls = FakeClock(), []
    trimmer = MallocTrimmer(10.0, 60.0, clock=clock, trim=lambda pad: calls.append(pad) or 1)
    clock.now = 59.0
    assert not trimmer.maybe_trim(idle=False)
    clock.now = 60.0
    assert trimmer.maybe_trim(idle=False)
    assert calls == [0]


def test_without_malloc_trim_nothing_happens(monkeypatch) -> None:
    monkeypatch.setattr(malloc_trim, "_malloc_trim", lambda: None)
    trimmer = MallocTrimmer(0.0, 0.0)
    assert not trimmer.maybe_trim(idle=True) and trimmer.trims == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_malloc_trim_is_found_and_runs() -> None:
    trim = malloc_trim._malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)


def test_capacity_set_unless_the_environment_has_one(monkeypatch) -> None:

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    bound_onednn_caches(32)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


# Linears at 100 new row counts (4 weight shapes each: 400 primitives, as a prefill instance
# meets them); prints how much malloc'd memory stayed in use, in MiB.
_GROWTH = """
import ctypes, torch
from worker.models.linear import OneDNNLinear

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo
kernel = OneDNNLinear()
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
weights = [(kernel.prepare(torch.randn(o, i)), i) for o, i in shapes]
for w, i in weights:
    kernel(torch.randn(1, i), w, None)
before = libc.mallinfo2().uordblks
for rows in range(2, 102):
    for w, i in weights:
        kernel(torch.randn(rows, i), w, None)
print((libc.mallinfo2().uordblks - before) / 2**20)
"""


def _growth_mib(capacity: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_GROWTH)],
        capture_output=True,
        text=True,
        cwd=_REPO,
        timeout=120,
        # The capacities as given (a value in the environment wins over pdserve's bound).
        env=os.environ | {name: capacity for name in _CAPACITY_VARIABLES},
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallinfo2 is glibc's")
def test_bounded_onednn_caches_keep_new_shapes_from_growing_memory() -> None:
    torch = pytest.importorskip("torch")
    from worker.models.linear import OneDNNLinear, select_linear

    if not isinstance(select_linear(torch.device("cpu"), torch.float32), OneDNNLinear):
        pytest.skip("this torch build or CPU has no oneDNN linear")
    # The premise: by default every new shape keeps ~0.3 MiB for good (400 primitives).
    assert _growth_mib("1024") > 80  # oneDNN's and ideep's defaults
    assert _growth_mib("16") < 25

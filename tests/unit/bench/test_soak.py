"""The soak's memory check: steady growth fails it, a plateau and its swings pass."""

from __future__ import annotations

import argparse
import importlib.util
from collections import Counter
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[3] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(soak, series) -> int:
    args = argparse.Namespace(config="tiny.yaml", minutes=3.0, rate=0.7)
    return soak.report(args, Counter(ok=100, left=20), series, leaks=[])


def test_steady_growth_fails(soak, capsys) -> None:
    # +0.6 MiB/s: the prefill instance before oneDNN's caches were bounded.
    series = [(t, {"prefill-0": 800 + 0.6 * t, "decode-0": 970.0}) for t in range(0, 181, 20)]
    assert _report(soak, series) == 1
    assert "memory grown: ['prefill-0']" in capsys.readouterr().out


def test_a_plateau_with_swings_passes(soak, capsys) -> None:
    # Filled up in the first minute, then swinging between malloc trims.
    def prefill(t: int) -> float:
        return min(800 + t, 840) + (30 if t % 60 == 0 else 0)

    series = [(t, {"prefill-0": prefill(t), "decode-0": 970.0}) for t in range(0, 181, 20)]
    assert _report(soak, series) == 0
    out = capsys.readouterr().out
    assert "memory grown: none" in out
    assert "| prefill-0 | 830 | 870 | 870 | +0 |" in out


def test_unexpected_outcomes_and_leaks_fail(soak) -> None:
    series = [(t, {"router": 220.0}) for t in range(0, 61, 20)]
    args = argparse.Namespace(config="tiny.yaml", minutes=1.0, rate=0.7)
    assert soak.report(args, Counter(ok=5, **{"HTTP 500": 1}), series, leaks=[]) == 1
    assert soak.report(args, Counter(ok=5), series, leaks=["prefill-0: 3 blocks held"]) == 1

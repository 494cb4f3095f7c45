"""benchmarks/gpu_prefill.py on a machine without a GPU: it imports, parses its arguments, and
counts a step's FLOPs as the Llama-3-8B shape has them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_prefill import attention_flops, linear_flops, parse_args
from benchmarks.model_folders import SHAPES
from worker.model_config import load_model_config

ROOT = Path(__file__).resolve().parents[2]


def test_arguments() -> None:
    args = parse_args([])
    assert args.lengths == [1024, 4096, 8192] and args.reps == 7 and args.out is None
    args = parse_args(["--lengths", "4096", "--reps", "3", "--out", "r.json"])
    assert args.lengths == [4096] and args.reps == 3 and args.out == Path("r.json")
    for bad in (["--lengths", "1"], ["--reps", "0"], ["--lengths", "9000"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_help_runs_without_a_gpu() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_prefill.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--lengths" in done.stdout


def test_flops_of_the_8b_shape(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SHAPES["llama3-8b"]))
    arch = load_model_config(tmp_path)
    # Per layer: qkv 4096 x 6144, o 4096 x 4096, gate_up 4096 x 28672, down 14336 x 4096.
    per_token = 2 * 32 * (4096 * 6144 + 4096 * 4096 + 4096 * 28672 + 14336 * 4096)
    assert linear_flops(arch, 10) == 10 * per_token  # ~13.9 GFLOP a token: 7B linear weights
    assert attention_flops(arch, 4096) == 2 * 2 * 32 * 32 * 128 * 4096 * 4096 / 2

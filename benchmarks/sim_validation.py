"""Check the elastic simulator against a real two-GPU 1P1D run (GPU machine; the lead runs it).

1. `benchmarks/gpu_decode.py` measures this GPU's decode steps and prefill rate (the cost model
   is fitted to them, not to the H100 figures in benchmarks/results/);
2. a 1P1D deployment of the Llama-3-8B shape (random weights, a GPU per instance) serves
   `pdserve bench` (prompts 2k +-50%, outputs 256 +-50%, Poisson at --rate, --ignore-eos);
3. benchmarks/simulate.py --replay-bench replays the very same requests (same seed, same
   lengths, same arrival times) on the simulated 1P1D and prints simulated vs measured TTFT and
   TPOT percentiles (goal: within 15%).

    . .devbundle/activate.sh && python3 benchmarks/sim_validation.py --out-dir sim_validation

Everything it measured is left in --out-dir (decode.json, bench.json, config.yaml,
validation.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.model_folders import SHAPES, write_model_folder  # noqa: E402


def config_for(folder: Path) -> dict:
    """configs/gpu-llama3-8b-1p1d.yaml on the random-weight folder."""
    raw = yaml.safe_load((ROOT / "configs" / "gpu-llama3-8b-1p1d.yaml").read_text())
    raw["model"].update({"path": str(folder), "load_format": "random"})
    raw["router"].update({"host": "127.0.0.1", "port": 8000})
    raw["slo"] = {"ttft_ms": 300, "tpot_ms": 12}
    return raw


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"pdserve serve exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"the deployment was not healthy after {timeout_s:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=Path("sim_validation"))
    p.add_argument("--rate", type=float, default=12.0)
    p.add_argument("--num-prompts", type=int, default=150)
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-decode-bench", action="store_true", help="reuse decode.json")
    args = p.parse_args()
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    if not args.skip_decode_bench:
        run([py, "benchmarks/gpu_decode.py", "--out", str(out / "decode.json")])
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model_folder(Path(tmp) / "llama3-8b-random", SHAPES["llama3-8b"])
        config = out / "config.yaml"
        config.write_text(yaml.safe_dump(config_for(folder)))
        server = subprocess.Popen(
            [py, "-m", "cluster.cli", "serve", str(config)], cwd=ROOT, env=os.environ.copy()
        )
        try:
            wait_healthy("http://127.0.0.1:8000", server, 900)
            # A warm-up burst (kernels, NIXL connections) that the comparison does not count.
            bench = [py, "-m", "cluster.cli", "bench", "--base-url", "http://127.0.0.1:8000"]
            bench += ["--tokenizer", str(folder), "--ignore-eos", "--no-progress"]
            run([*bench, "--num-prompts", "8", "--input-len", "512", "--output-len", "16"])
            run(
                [
                    *bench,
                    *("--num-prompts", str(args.num_prompts), "--request-rate", str(args.rate)),
                    *("--input-len", str(args.input_len), "--output-len", str(args.output_len)),
                    *("--range-ratio", "0.5", "--seed", str(args.seed)),
                    *("--slo", "ttft=300,tpot=12", "--json", str(out / "bench.json")),
                ]
            )
        finally:
            server.terminate()
            server.wait(120)
        with open(out / "validation.md", "w") as report:
            run(
                [
                    py,
                    "benchmarks/simulate.py",
                    *("--replay-bench", str(out / "bench.json"), "--config", str(config)),
                    *("--cost-decode", str(out / "decode.json"), "--cost-pd", "none"),
                ],
                stdout=report,
            )
    print((out / "validation.md").read_text())


if __name__ == "__main__":
    main()

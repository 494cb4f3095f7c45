"""PNG figures of one run: latency CDFs and throughput / running requests over time.

matplotlib is imported inside the functions (an optional extra: `pip install pdserve[bench]`)
and pinned to the Agg backend, so plotting works on headless machines and never opens a window.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cluster.bench import BenchError
from cluster.bench.client import RequestRecord
from cluster.bench.report import metric_values_s

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_TITLES = {
    "ttft": ("TTFT (time to first token)", "fraction of requests"),
    "tpot": ("TPOT (time per output token)", "fraction of requests"),
    "itl": ("ITL (gap between streamed chunks)", "fraction of gaps"),
    "e2e": ("End-to-end latency", "fraction of requests"),
}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib: pip install 'pdserve[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    records: list[RequestRecord],
    duration_s: float,
    out_dir: str | Path,
    title: str = "",
    slo_ms: dict[str, float] | None = None,
) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "latency_cdf.png", out / "throughput.png"]
    plot_latency_cdfs(records, paths[0], title, slo_ms or {})
    plot_throughput(records, duration_s, paths[1], title)
    return paths


def plot_latency_cdfs(
    records: list[RequestRecord], path: Path, title: str, slo_ms: dict[str, float]
) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, metric in zip(axes.flat, _TITLES, strict=True):
        values_ms = np.sort(np.asarray(metric_values_s(records, metric)) * 1000.0)
        _cdf_panel(ax, metric, values_ms, slo_ms.get(metric))
    fig.suptitle(f"Latency CDFs{' - ' + title if title else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cdf_panel(ax: Axes, metric: str, values_ms: np.ndarray, slo: float | None) -> None:
    name, ylabel = _TITLES[metric]
    ax.set_title(f"{name}, n={len(values_ms)}")
    ax.set_xlabel("ms")
    ax.set_ylabel(ylabel)
    if len(values_ms) == 0:
        # e.g. TPOT when every output is one token: say so rather than leave a blank frame.
        note = "no samples: every successful output was a single token"
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return
    fraction = np.arange(1, len(values_ms) + 1) / len(values_ms)
    # Start the curve at 0 so the smallest sample shows as a step, not as the curve's origin.
    ax.step(np.r_[values_ms[0], values_ms], np.r_[0.0, fraction], where="post", color="tab:blue")
    for q, style in ((50, ":"), (99, "--")):
        value = float(np.percentile(values_ms, q))
        ax.axvline(value, color="gray", linestyle=style, label=f"p{q} = {value:.1f} ms")
    if slo is not None:
        ax.axvline(slo, color="tab:red", label=f"SLO = {slo:g} ms")
    low, high = float(values_ms[0]), float(values_ms[-1])
    if low > 0 and high / low > 100:  # long tails squash a linear axis into one vertical line
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def tokens_per_second_bins(
    records: list[RequestRecord], duration_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin starts, bin widths, output tokens/s in each bin) over successful requests.

    Bins are 1 s, except that the last one ends with the run (0.5 to 1.5 s wide), so a partial
    second is drawn neither as a dip nor, when very short, as a spike. A chunk counts as
    output_tokens / chunks tokens, so rate * width adds up to the reported total."""
    full = math.floor(duration_s)
    edges = np.arange(0.0, full + 1.0)
    if duration_s - full >= 0.5 or (full == 0 and duration_s > 0):
        edges = np.append(edges, duration_s)
    elif full >= 1:
        edges[-1] = duration_s
    if len(edges) < 2:  # a run of zero length still gets one bin to draw
        edges = np.array([0.0, 1.0])
    times: list[float] = []
    weights: list[float] = []
    for record in records:
        chunk_times = record.chunk_times_s() if record.success else []
        times += chunk_times
        weights += [record.output_tokens / max(len(chunk_times), 1)] * len(chunk_times)
    # The last chunk can land a hair after duration_s (measured separately): keep it in the bins.
    counts, _ = np.histogram(np.minimum(times, edges[-1]), bins=edges, weights=weights)
    widths = np.diff(edges)
    return edges[:-1], widths, counts / widths


def running_over_time(records: list[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Step function of requests in flight: (event times, count from each time on)."""
    events = sorted(
        [(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records],
        key=lambda e: (e[0], e[1]),  # at equal times, end before start: no phantom peak
    )
    times = np.asarray([0.0] + [t for t, _ in events])
    running = np.concatenate([[0], np.cumsum([d for _, d in events])])
    return times, running


def plot_throughput(
    records: list[RequestRecord], duration_s: float, path: Path, title: str
) -> None:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    starts, widths, rates = tokens_per_second_bins(records, duration_s)
    top.bar(starts, rates, width=widths, align="edge", color="tab:blue", alpha=0.8)
    if duration_s > 0:
        mean = sum(r.output_tokens for r in records if r.success) / duration_s
        top.axhline(mean, color="tab:orange", linestyle="--", label=f"mean = {mean:.1f} tok/s")
        top.legend(loc="upper right", fontsize=8)
    top.set_ylabel("output tokens/s")
    top.set_title("Output token throughput (1-s bins)")
    top.grid(alpha=0.3)
    times, running = running_over_time(records)
    bottom.step(times, running, where="post", color="tab:green")
    bottom.fill_between(times, running, step="post", color="tab:green", alpha=0.2)
    bottom.set_ylabel("requests in flight")
    bottom.set_xlabel("time since start (s)")
    bottom.set_title("Running requests")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    bottom.set_xlim(0, max(duration_s, 1e-3))
    fig.suptitle(f"Throughput over time{' - ' + title if title else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

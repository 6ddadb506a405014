"""PNG plots beside a run's results.json: latency vs offered load, latency CDF at one load, RSS curve,
dynamic batching on/off. `python bench/plots.py bench/results/<date>/<run>` re-renders them."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from hdr import Histogram  # noqa: E402

PERCENTILES = (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9"))


def _ok(points: list[dict]) -> list[dict]:
    return [p for p in points if "failed" not in p]


def cdf_load(points: list[dict]) -> float | None:
    """The highest offered load every series of a workload sustained (>= 90% achieved), for a fair CDF."""
    by_rate: dict[float, list[dict]] = defaultdict(list)
    for p in points:
        by_rate[p["offered_rps"]].append(p)
    series = {p["series"] for p in points}
    good = [r for r, ps in by_rate.items()
            if {p["series"] for p in ps} == series and all(p["ok"] >= 0.9 * (p["sent"] + p["drops"]) for p in ps)]
    return max(good) if good else (min(by_rate) if by_rate else None)


def render(run_dir: Path) -> list[Path]:
    data = json.loads((Path(run_dir) / "results.json").read_text())
    tag = " (QUICK SMOKE RUN: noisy, not a result)" if data["meta"].get("quick") else ""
    written: list[Path] = []
    sweep = defaultdict(list)
    for p in _ok(data["points"]):
        if p.get("phase") == "sweep":
            sweep[p["workload"]].append(p)

    for workload, points in sweep.items():
        fig, axes = plt.subplots(1, len(PERCENTILES), figsize=(5 * len(PERCENTILES), 4.2), sharey=True)
        by_series = defaultdict(list)
        for p in points:
            by_series[p["series"]].append(p)
        for ax, (key, name) in zip(axes, PERCENTILES):
            for series, ps in sorted(by_series.items()):
                ps.sort(key=lambda p: p["offered_rps"])
                ax.plot([p["offered_rps"] for p in ps], [p["latency"][key] / 1000 for p in ps], marker="o", label=series)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("offered load (req/s)")
            ax.set_title(name)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("latency (ms, from intended send time)")
        axes[-1].legend(fontsize=7)
        fig.suptitle(f"{workload}: latency vs offered load{tag}")
        fig.tight_layout()
        written.append(_save(fig, run_dir / f"latency_{workload}.png"))

        rate = cdf_load(points)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p in sorted((p for p in points if p["offered_rps"] == rate), key=lambda p: p["series"]):
            x, y = Histogram.from_dict(p["histogram"]).cdf()
            ax.plot(x / 1000, y, label=p["series"])
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{workload}: latency CDF at {rate:g} req/s{tag}", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, run_dir / f"cdf_{workload}.png"))

    memory = [m for m in data.get("memory", []) if m.get("rss_samples", {}).get("rows")]
    if memory:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in memory:
            rows = m["rss_samples"]["rows"]
            ax.plot([r[1] for r in rows], [r[2] / 1024 for r in rows], label=m["series"])
        ax.set_xlabel(f"requests completed ({memory[0].get('batch')} rows each)")
        ax.set_ylabel("server RSS (MiB)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Iskander server RSS under large batches{tag}", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, run_dir / "rss.png"))

    dyn = _ok(data.get("dynamic_batching", []))
    if dyn:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        names = [d["series"].replace("iskander/", "") for d in dyn]
        a1.barh(names, [d["achieved_rps"] for d in dyn])
        a1.set_xlabel("throughput (req/s, batch 1)")
        a2.barh(names, [d["latency"]["p99_us"] / 1000 for d in dyn])
        a2.set_xlabel("p99 latency (ms)")
        a2.set_yticks([])
        fig.suptitle(f"dynamic batching, closed loop{tag}", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, run_dir / "dynamic_batching.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for out in render(Path(sys.argv[1])):
        print(out)

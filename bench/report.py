"""Markdown tables for BENCHMARK.md from one run's results.json.

    python bench/report.py bench/results/<date>/<run> [--out FILE]

Per workload: the open-loop sweep (each offered load, each series: p50/p95/p99/p99.9/avg, achieved
rate, drops, errors, and ratios against the minimal server on the same transport and against
MLServer at the same offered load), the highest load each series sustained, the closed-loop peak;
then dynamic batching on/off and the server's RSS curve. Ratios come from the same run only:
absolute numbers move 20-40% between runs on shared machines, ratios much less.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

BASELINE_MLSERVER = "mlserver/oip"


def us(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} us"


def ratio(a, b) -> str:
    if not a or not b or not math.isfinite(a) or not math.isfinite(b):
        return "-"
    return f"{a / b:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def errors_cell(p: dict) -> str:
    if not p["error_count"]:
        return "0"
    return f"{p['error_count']} ({', '.join(f'{k}: {v}' for k, v in sorted(p['errors'].items()))})"


def minimal_of(series: str) -> str:
    return "minimal/" + series.split("/", 1)[1]


def sweep_section(points: list[dict]) -> list[str]:
    lines = []
    by_rate: dict[float, dict[str, dict]] = defaultdict(dict)
    for p in points:
        by_rate[p["offered_rps"]][p["series"]] = p
    header = ["offered req/s", "series", "p50", "p95", "p99", "p99.9", "avg", "achieved req/s", "drops", "errors",
              "p50 / minimal", "p99 / minimal", "p50 / MLServer", "p99 / MLServer"]
    rows = []
    for rate in sorted(by_rate):
        group = by_rate[rate]
        for series in sorted(group, key=_series_order):
            p = group[series]
            if "failed" in p:
                rows.append([f"{rate:g}", series, *["-"] * 8, f"failed: {p['failed'][:80]}", "-", "-", "-"])
                continue
            lat = p["latency"]
            mini = group.get(minimal_of(series)) if not series.startswith(("minimal/", "onnxruntime/")) else None
            mls = group.get(BASELINE_MLSERVER) if series != BASELINE_MLSERVER and not series.startswith("onnxruntime/") else None
            ml, mm = (mini or {}).get("latency", {}), (mls or {}).get("latency", {})
            p999 = us(lat["p999_us"]) + (" †" if lat["count"] < 1000 else "")  # under 1000 samples it is ~ the max
            rows.append([
                f"{rate:g}", series, us(lat["p50_us"]), us(lat["p95_us"]), us(lat["p99_us"]), p999,
                us(lat["mean_us"]), f"{p['achieved_rps']:.1f}", p["drops"], errors_cell(p),
                ratio(lat["p50_us"], ml.get("p50_us")), ratio(lat["p99_us"], ml.get("p99_us")),
                ratio(lat["p50_us"], mm.get("p50_us")), ratio(lat["p99_us"], mm.get("p99_us")),
            ])
    lines += table(header, rows)
    if any(p.get("latency", {}).get("count", 1000) < 1000 for p in points):
        lines += ["† fewer than 1000 requests at that point: p99.9 is close to the maximum, not a percentile.", ""]

    # Highest load each series sustained, and why it left the sweep.
    rows = []
    per_series: dict[str, list[dict]] = defaultdict(list)
    for p in points:
        per_series[p["series"]].append(p)
    for series in sorted(per_series, key=_series_order):
        ps = sorted(per_series[series], key=lambda p: p["offered_rps"])
        ok = [p for p in ps if not p.get("saturated")]
        stop = next((p for p in ps if p.get("saturated")), None)
        rows.append([series, f"{ok[-1]['offered_rps']:g}" if ok else "none",
                     f"{stop['offered_rps']:g}: {stop['saturated']}" if stop else "not reached (grid ended)"])
    lines += ["Highest offered load sustained (>= 90% of scheduled requests answered, < 1% errors, p99 under "
              "--explode x its first-load p99):", ""]
    lines += table(["series", "sustained req/s", "left the sweep at"], rows)
    return lines


def peak_section(points: list[dict], batch: int) -> list[str]:
    rows = []
    by_series = {p["series"]: p for p in points}
    for series in sorted(by_series, key=_series_order):
        p = by_series[series]
        if "failed" in p:
            rows.append([series, "-", "-", "-", "-", "-", f"failed: {p['failed'][:80]}", "-", "-"])
            continue
        mini = by_series.get(minimal_of(series)) if not series.startswith(("minimal/", "onnxruntime/")) else None
        mls = by_series.get(BASELINE_MLSERVER) if series != BASELINE_MLSERVER and not series.startswith("onnxruntime/") else None
        cpu = p.get("server_cpu_s")
        rows.append([
            series, f"{p['achieved_rps']:.0f}", f"{p['achieved_rps'] * batch:,.0f}", us(p["latency"]["p50_us"]),
            us(p["latency"]["p99_us"]), f"{cpu / p['ok'] * 1e6:.0f} us" if cpu and p["ok"] else "-", errors_cell(p),
            ratio(p["achieved_rps"], (mini or {}).get("achieved_rps")), ratio(p["achieved_rps"], (mls or {}).get("achieved_rps")),
        ])
    return table(["series", "req/s", "rows/s", "p50", "p99", "server CPU / req", "errors",
                  "throughput / minimal", "throughput / MLServer"], rows)


def dynbatch_section(items: list[dict]) -> list[str]:
    rows = []
    by_key = {}
    for p in items:
        on = bool(p.get("dynamic_batching"))
        by_key[(p["transport"], on)] = p
        if "failed" in p:
            rows.append([p["transport"], "on" if on else "off", "-", "-", "-", "-", "-", f"failed: {p['failed'][:80]}", "-"])
            continue
        cpu = p.get("server_cpu_s")
        base = by_key.get((p["transport"], False)) if on else None
        rows.append([p["transport"], "on" if on else "off", f"{p['achieved_rps']:.0f}", us(p["latency"]["p50_us"]),
                     us(p["latency"]["p99_us"]), us(p["latency"]["p999_us"]),
                     f"{cpu / p['ok'] * 1e6:.0f} us" if cpu and p["ok"] else "-", errors_cell(p),
                     ratio(p["achieved_rps"], (base or {}).get("achieved_rps")) if on else ""])
    return table(["transport", "dynamic batching", "req/s", "p50", "p99", "p99.9", "server CPU / req", "errors",
                  "throughput vs off"], rows)


def memory_section(items: list[dict]) -> list[str]:
    lines = []
    rows = []
    for m in items:
        samples = m.get("rss_samples", {}).get("rows") or []
        if not samples:
            rows.append([m.get("series", "?"), "-", "-", "-", "-", "-", m.get("failed", "no samples")])
            continue
        done = samples[-1][1]
        start_kb = samples[0][2]
        warm = next((s for s in samples if s[1] >= max(1, done // 10)), samples[0])  # after 10% of the requests
        end_kb, max_kb = samples[-1][2], max(s[2] for s in samples)
        growth = (end_kb - warm[2]) / 1024 / max(1, (done - warm[1]) / 1000)
        rows.append([m["series"], done, f"{start_kb / 1024:.1f}", f"{warm[2] / 1024:.1f}", f"{max_kb / 1024:.1f}",
                     f"{end_kb / 1024:.1f}", f"{growth:+.2f}"])
    lines += table(["series", "requests", "RSS at start (MiB)", "after 10% (MiB)", "max (MiB)", "end (MiB)",
                    "growth after 10% (MiB / 1000 req)"], rows)
    for m in items:
        samples = m.get("rss_samples", {}).get("rows") or []
        if samples:
            done = samples[-1][1]
            marks = []
            for frac in (0, 0.1, 0.25, 0.5, 0.75, 1.0):
                s = next((s for s in samples if s[1] >= frac * done), samples[-1])
                marks.append(f"{s[1]}: {s[2] / 1024:.1f}")
            lines += [f"RSS curve {m['series']} (requests: MiB): " + ", ".join(marks), ""]
    return lines


def _series_order(series: str) -> tuple:
    system, transport = series.split("/", 1)
    order = {"iskander": 0, "minimal": 1, "mlserver": 2, "onnxruntime": 3}
    return (order.get(system, 9), transport)


def render(run_dir: Path) -> str:
    data = json.loads((run_dir / "results.json").read_text())
    meta, args = data["meta"], data["meta"]["args"]
    out = [f"# Iskander load benchmark: {meta['date']}", ""]
    if meta.get("quick"):
        out += ["> **SMOKE RUN (`--quick`)**: 2-second points on a shared machine. It only shows that the",
                "> harness works; none of these numbers is a result.", ""]
    v = meta["versions"]
    out += [
        f"- git commit `{meta.get('git_commit')}`" + (" (iskander/ had uncommitted changes)" if meta.get("iskander_tree_dirty") else ""),
        f"- machine: {meta['cpus']} CPUs, {meta['platform']}, Python {meta['python']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in meta['loadavg_at_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in meta.get('loadavg_at_end', []))}",
        f"- onnxruntime {v.get('onnxruntime')}, pyarrow {v.get('pyarrow')}, grpcio {v.get('grpcio')}, "
        f"tritonclient {v.get('tritonclient')}; MLServer {meta['mlserver']['version']} "
        f"(parallel_workers {meta['mlserver']['parallel_workers']})",
        f"- every system: same ONNX file, onnxruntime intra_op {meta['ort_settings']['intra_op']}, inter_op "
        f"{meta['ort_settings']['inter_op']}, optimisation {meta['ort_settings']['optimization']}",
        f"- open loop: {args['arrival']} arrivals, {args['duration']:g} s per point, {args['workers']} client processes x "
        f"{args['slots']} in-flight slots, drop after {args['slack_ms']:g} ms without a free slot; latency from the "
        "intended send time",
        f"- closed-loop peak: {args['peak_workers']} x {args['peak_slots']} clients, {args['peak_duration']:g} s",
        "",
        "Series: `iskander/flight_kept` (one DoExchange stream per client slot), `iskander/flight_new` (a new stream "
        "per request), `iskander/oip` (tritonclient.grpc, raw tensors); `minimal/*` the same clients against a bare "
        "pyarrow.flight / grpcio server (the limit); `mlserver/oip` Seldon MLServer with an onnxruntime MLModel; "
        "`onnxruntime/ort` session.run inside the client process (the floor, including the load generator's own "
        "scheduling cost).",
        "",
    ]
    points = [p for p in data["points"]]
    workloads = list(dict.fromkeys(p["workload"] for p in points))
    for w in workloads:
        wp = [p for p in points if p["workload"] == w]
        batch = wp[0]["batch"]
        out += [f"## {wp[0]['model']}, batch {batch}", ""]
        sweep = [p for p in wp if p.get("phase") == "sweep"]
        if sweep:
            out += ["### Open loop at fixed offered load", ""] + sweep_section(sweep)
        peak = [p for p in wp if p.get("phase") == "peak"]
        if peak:
            out += ["### Closed-loop peak", ""] + peak_section(peak, batch)
    if data.get("dynamic_batching"):
        a = args
        model = a.get("dynbatch_model", "two_tower")
        out += [f"## Dynamic batching ({model}, batch-1 requests, closed loop)", "",
                f"{a['dynbatch_workers'] * a['dynbatch_slots']} concurrent clients ({a['dynbatch_workers']} processes x "
                f"{a['dynbatch_slots']}), {a['dynbatch_duration']:g} s; `on` = "
                "`dynamic_batching = { max_batch_rows = 64, max_queue_delay_us = 2000 }`.", ""]
        out += dynbatch_section(data["dynamic_batching"])
    if data.get("memory"):
        out += [f"## Server memory (RSS) under {args['memory_batch']}-row requests", "",
                f"One client sending {args['memory_requests']} requests back to back to a fresh Iskander process; "
                f"RSS sampled every {args['memory_interval']:g} s from /proc.", ""]
        out += memory_section(data["memory"])
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write here instead of stdout")
    args = parser.parse_args()
    text = render(args.run_dir)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()

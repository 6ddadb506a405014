"""Iskander load benchmark: open-loop sweeps against matched baselines, closed-loop peaks, dynamic
batching on/off, and server memory under large batches. `make bench` runs it with the defaults.

    python bench/run.py                 # everything, full durations (about an hour; a quiet machine please)
    python bench/run.py --quick         # smoke run: 2 s points, one workload, one load, each system once
    python bench/run.py --workloads two_tower:128 --systems iskander,minimal --phases sweep,peak
    python bench/report.py bench/results/<date>/<run>   # the markdown tables for BENCHMARK.md

Method. Every system gets the same model file, the same onnxruntime settings and the same request
bytes (workloads.py). For each workload all systems are started together and the sweep is
interleaved: at each offered load every still-unsaturated series (system x transport) runs one
point before the load goes up, so slow drift on a shared machine hits all systems alike. A series
leaves the sweep when it achieves < 90% of the offered load, when > 1% of its requests fail, or
when its p99 exceeds --explode times its p99 at the first load. Compare ratios within one run.

Output: bench/results/<YYYY-MM-DD>/<run>/results.json (rewritten after every point, so a crash
keeps what was measured) and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from loadgen import LoadSpec, run_load
from systems import SYSTEMS, Iskander, System, rss_kb
from workloads import ORT_SETTINGS, Workload, parse, wide_mlp_file

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WORKLOADS = "two_tower:1,two_tower:32,two_tower:128,two_tower:1024,two_tower:8192,tabular:128"
DYNAMIC_BATCHING = {"max_batch_rows": 64, "max_queue_delay_us": 2000}


# --- results file --------------------------------------------------------------------------------

class Results:
    def __init__(self, out_dir: Path, meta: dict) -> None:
        self.path = out_dir / "results.json"
        self.data = {"meta": meta, "points": [], "dynamic_batching": [], "memory": []}
        out_dir.mkdir(parents=True, exist_ok=True)
        self.save()

    def add(self, section: str, item: dict) -> None:
        self.data[section].append(item)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default) + "\n")
        tmp.replace(self.path)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


# --- measuring -----------------------------------------------------------------------------------

def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the server processes, for CPU cost per request (robust to a noisy neighbour)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(system: System, transport: str, workload: Workload, args, **spec_kw) -> dict:
    """One load point; failures become a result with `failed` set instead of aborting the run."""
    pids = [p.pid for p in system.procs]
    labels = {"workload": workload.key, "model": workload.model_name, "batch": workload.batch,
              "system": system.label, "transport": transport, "series": f"{system.label}/{transport}"}
    spec = LoadSpec(client=transport, endpoint=system.endpoint, model=workload.model_name, batch=workload.batch,
                    arrival=args.arrival, slack_ms=args.slack_ms, warmup=warmup_for(workload.batch, args),
                    labels=labels, **spec_kw)
    cpu0 = cpu_seconds(pids)
    try:
        res = run_load(spec)
    except Exception as exc:  # noqa: BLE001 - one broken series must not end a long run
        return {**labels, "mode": spec.mode, "offered_rps": spec.rate if spec.mode == "open" else None,
                "failed": f"{type(exc).__name__}: {exc}"}
    res["mode"] = spec.mode
    res["server_cpu_s"] = cpu_seconds(pids) - cpu0 if pids else None
    res["server_rss_kb"] = rss_kb(system.pid) if system.pid else None
    res["loadavg"] = os.getloadavg()
    return res


def warmup_for(batch: int, args) -> int:
    return max(2, min(args.warmup, 20000 // batch))


def fmt_us(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v / 1000:.2f}ms" if v >= 1000 else f"{v:.0f}us"


def show(res: dict) -> None:
    if "failed" in res:
        print(f"  {res['series']:24} FAILED {res['failed'][:200]}", flush=True)
        return
    lat = res["latency"]
    offered = f"{res['offered_rps']:8.1f}/s" if res.get("offered_rps") else "  closed  "
    print(f"  {res['series']:24} offered {offered} achieved {res['achieved_rps']:8.1f}/s "
          f"p50 {fmt_us(lat['p50_us']):>8} p95 {fmt_us(lat['p95_us']):>8} p99 {fmt_us(lat['p99_us']):>8} "
          f"p99.9 {fmt_us(lat['p999_us']):>8} avg {fmt_us(lat['mean_us']):>8} "
          f"drops {res['drops']} errors {res['error_count']}"
          + (f" {res['errors']}" if res["error_count"] else ""), flush=True)


def saturated(res: dict, first_p99: float | None, explode: float) -> str | None:
    if "failed" in res:
        return "failed"
    # Against the requests actually scheduled, not the nominal rate: with Poisson arrivals and a
    # few dozen requests per point (big batches), the count alone can miss the nominal rate by 15%.
    if res["ok"] < 0.9 * (res["sent"] + res["drops"]):
        return "< 90% of scheduled requests answered (drops or errors)"
    if res["error_count"] > 0.01 * max(res["sent"], 1):
        return "errors > 1%"
    if first_p99 and res["latency"]["p99_us"] > explode * first_p99:
        return f"p99 > {explode:g}x its first-load p99"
    return None


def rate_grid(workload: Workload, args) -> list[float]:
    if args.rates:
        return [float(r) for r in args.rates.split(",")]
    start = args.start_rate or max(2.0, min(50.0, 20000.0 / workload.batch))  # ~same rows/s at the start
    rates, r = [], start
    while r <= args.max_rate and len(rates) < 40:
        rates.append(round(r, 2))
        r *= args.step
    return rates


# --- phases --------------------------------------------------------------------------------------

def start_systems(names: list[str], workdir: Path, models: list[str], args) -> list[System]:
    started = []
    workdir.mkdir(parents=True, exist_ok=True)
    for name in names:
        system = SYSTEMS[name](parallel_workers=args.mlserver_workers) if name == "mlserver" else SYSTEMS[name]()
        print(f"[bench] starting {name} ...", flush=True)
        try:
            system.start(workdir, models)
        except Exception as exc:  # noqa: BLE001 - report and go on with the systems that started
            print(f"[bench] {name} failed to start: {exc}", flush=True)
            continue
        LIVE.append(system)
        started.append(system)
    return started


def stop_systems(systems: list[System]) -> None:
    for s in systems:
        s.stop()
        if s in LIVE:
            LIVE.remove(s)


def run_workload(workload: Workload, args, results: Results, workdir: Path) -> None:
    print(f"\n[bench] workload {workload.key}", flush=True)
    systems = start_systems(args.systems, workdir / workload.key, [workload.model_name], args)
    try:
        series = [(s, t) for s in systems for t in s.transports if t in args.transports]
        if "sweep" in args.phases:
            active = list(series)
            first_p99: dict[str, float] = {}
            for rate in rate_grid(workload, args):
                if not active:
                    break
                print(f" offered load {rate:g} req/s ({rate * workload.batch:,.0f} rows/s)", flush=True)
                for system, transport in list(active):
                    res = measure(system, transport, workload, args, mode="open", rate=rate,
                                  duration_s=args.duration, workers=args.workers, slots=args.slots)
                    key = f"{system.label}/{transport}"
                    if "failed" not in res and key not in first_p99:
                        first_p99[key] = res["latency"]["p99_us"]
                    reason = saturated(res, first_p99.get(key), args.explode)
                    res["phase"], res["saturated"] = "sweep", reason
                    results.add("points", res)
                    show(res)
                    if reason:
                        print(f"  {key:24} leaves the sweep: {reason}", flush=True)
                        active.remove((system, transport))
        if "peak" in args.phases:
            print(f" closed-loop peak ({args.peak_workers} x {args.peak_slots} clients)", flush=True)
            for system, transport in series:
                res = measure(system, transport, workload, args, mode="closed", duration_s=args.peak_duration,
                              workers=args.peak_workers, slots=args.peak_slots)
                res["phase"] = "peak"
                results.add("points", res)
                show(res)
    finally:
        stop_systems(systems)


def run_dynamic_batching(args, results: Results, workdir: Path) -> None:
    workload = Workload(args.dynbatch_model, 1)
    if args.dynbatch_model == "wide_mlp":
        wide_mlp_file()
    clients = args.dynbatch_workers * args.dynbatch_slots
    print(f"\n[bench] dynamic batching: {args.dynbatch_model} batch 1, closed loop, {clients} clients, "
          f"{DYNAMIC_BATCHING}", flush=True)
    for setting in (None, DYNAMIC_BATCHING):
        system = Iskander(dynamic_batching=setting, instances=args.dynbatch_instances)  # creates the folder
        system.start(workdir / ("dynbatch-on" if setting else "dynbatch-off"), [args.dynbatch_model])
        LIVE.append(system)
        try:
            for transport in args.dynbatch_transports:
                res = measure(system, transport, workload, args, mode="closed", duration_s=args.dynbatch_duration,
                              workers=args.dynbatch_workers, slots=args.dynbatch_slots)
                res["phase"], res["dynamic_batching"] = "dynamic_batching", setting
                res["model"] = args.dynbatch_model
                res["series"] = f"iskander/{transport} batching={'on' if setting else 'off'}"
                results.add("dynamic_batching", res)
                show(res)
        finally:
            stop_systems([system])


def run_memory(args, results: Results, workdir: Path) -> None:
    workload = Workload("two_tower", args.memory_batch)
    print(f"\n[bench] memory: Iskander RSS across {args.memory_requests} requests of {args.memory_batch} rows", flush=True)
    for transport in args.memory_transports:
        system = Iskander()
        system.start(workdir / f"memory-{transport}", ["two_tower"])
        LIVE.append(system)
        progress = mp.get_context("spawn").Value("q", 0)
        samples: list[tuple[float, int, int]] = []
        stop = threading.Event()
        t_start = time.monotonic()

        def sample() -> None:  # bounded: ends with the load, at most one sample per interval
            while not stop.is_set():
                kb = rss_kb(system.pid)
                if kb is None:
                    return
                samples.append((round(time.monotonic() - t_start, 3), progress.value, kb))
                stop.wait(args.memory_interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            spec = LoadSpec(client=transport, endpoint=system.endpoint, model="two_tower", batch=args.memory_batch,
                            mode="closed", duration_s=args.memory_timeout, workers=1, slots=1, warmup=1,
                            max_requests=args.memory_requests,
                            labels={"series": f"iskander/{transport}", "system": "iskander", "transport": transport,
                                    "workload": workload.key, "batch": args.memory_batch})
            try:
                res = run_load(spec, progress=progress)
                res["mode"] = "closed"
            except Exception as exc:  # noqa: BLE001
                res = {**spec.labels, "failed": f"{type(exc).__name__}: {exc}"}
            time.sleep(min(1.0, args.memory_interval * 2))  # one idle sample after the load
        finally:
            stop.set()
            sampler.join(timeout=5)
            stop_systems([system])
        res["phase"] = "memory"
        res["rss_samples"] = {"fields": ["t_s", "requests_done", "rss_kb"], "rows": samples}
        results.add("memory", res)
        show(res)
        if samples:
            kbs = [s[2] for s in samples]
            print(f"  {'RSS':24} start {kbs[0] / 1024:.1f} MiB, max {max(kbs) / 1024:.1f} MiB, "
                  f"end {kbs[-1] / 1024:.1f} MiB over {samples[-1][1]} requests", flush=True)


# --- CLI -----------------------------------------------------------------------------------------

LIVE: list[System] = []  # started systems, stopped in `finally` whatever happens


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: two_tower:128, one load, 2 s points")
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS, help="comma list of model:batch")
    p.add_argument("--systems", default="iskander,minimal,mlserver,onnxruntime")
    p.add_argument("--transports", default="flight_kept,flight_new,oip,ort")
    p.add_argument("--phases", default="sweep,peak,dynbatch,memory")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per open-loop point")
    p.add_argument("--rates", default="", help="explicit offered loads (req/s), comma list; default: geometric grid")
    p.add_argument("--start-rate", type=float, default=0.0, help="first load of the grid (default: by batch size)")
    p.add_argument("--step", type=float, default=2.0, help="grid factor between loads")
    p.add_argument("--max-rate", type=float, default=20000.0)
    p.add_argument("--explode", type=float, default=20.0, help="stop a series when p99 > this x its first p99")
    p.add_argument("--arrival", choices=["poisson", "constant"], default="poisson")
    p.add_argument("--workers", type=int, default=2, help="load-generator processes (open loop)")
    p.add_argument("--slots", type=int, default=8, help="in-flight requests per worker (open loop)")
    p.add_argument("--slack-ms", type=float, default=5.0, help="a send later than this for want of a free slot is a drop")
    p.add_argument("--warmup", type=int, default=20, help="requests per slot before timing (fewer for big batches)")
    p.add_argument("--peak-duration", type=float, default=10.0)
    p.add_argument("--peak-workers", type=int, default=2)
    p.add_argument("--peak-slots", type=int, default=4)
    p.add_argument("--dynbatch-duration", type=float, default=15.0)
    p.add_argument("--dynbatch-workers", type=int, default=4)
    p.add_argument("--dynbatch-slots", type=int, default=8)
    p.add_argument("--dynbatch-transports", default="flight_kept,oip")
    p.add_argument("--dynbatch-instances", type=int, default=1,
                   help="Iskander `instances` for the dynamic batching phase (sessions; batcher worker threads)")
    p.add_argument("--dynbatch-model", default="two_tower", choices=["two_tower", "tabular", "wide_mlp"],
                   help="wide_mlp: a model whose per-call cost dominates (built on first use)")
    p.add_argument("--memory-requests", type=int, default=10000)
    p.add_argument("--memory-batch", type=int, default=8192)
    p.add_argument("--memory-timeout", type=float, default=1800.0, help="upper bound on the memory phase, seconds")
    p.add_argument("--memory-interval", type=float, default=0.1, help="seconds between RSS samples")
    p.add_argument("--memory-transports", default="flight_kept,oip")
    p.add_argument("--mlserver-workers", type=int, default=0, help="MLServer parallel_workers (0: in process)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<date>/<run>)")
    p.add_argument("--keep-tmp", action="store_true", help="keep server configs and logs")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.quick:  # every knob small; explicit flags given with --quick still win where they differ from defaults
        d = p.parse_args([])
        quick = {"workloads": "two_tower:128", "duration": 2.0, "rates": "200", "peak_duration": 2.0,
                 "dynbatch_duration": 2.0, "dynbatch_workers": 2, "dynbatch_slots": 4, "memory_requests": 200,
                 "memory_timeout": 60.0, "warmup": 5}
        for k, v in quick.items():
            if getattr(args, k) == getattr(d, k):
                setattr(args, k, v)
    for name in ("systems", "transports", "phases", "dynbatch_transports", "memory_transports"):
        setattr(args, name, [x for x in getattr(args, name).split(",") if x])
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    args.workloads = [parse(w) for w in args.workloads.split(",") if w]
    return args


def machine_meta(args) -> dict:
    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "iskander"], cwd=BENCH_DIR,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = None, None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "git_commit": commit, "iskander_tree_dirty": dirty,
        "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: version(p) for p in ("iskander", "onnxruntime", "pyarrow", "grpcio", "tritonclient", "numpy")},
        "mlserver": {"version": "1.7.1", "parallel_workers": args.mlserver_workers},
        "ort_settings": ORT_SETTINGS,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "workloads"},
        "workloads": [w.key for w in args.workloads],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now().strftime("%H%M%S")
    out = args.out or BENCH_DIR / "results" / dt.date.today().isoformat() / f"load-{stamp}{'-quick' if args.quick else ''}"
    results = Results(out, machine_meta(args))
    workdir = Path(tempfile.mkdtemp(prefix="iskander-bench-"))
    print(f"[bench] results -> {results.path}\n[bench] server configs and logs -> {workdir}", flush=True)
    ok = False
    try:
        for workload in args.workloads:
            if {"sweep", "peak"} & set(args.phases):
                run_workload(workload, args, results, workdir)
        if "dynbatch" in args.phases:
            run_dynamic_batching(args, results, workdir)
        if "memory" in args.phases:
            run_memory(args, results, workdir)
        ok = True
    except KeyboardInterrupt:
        print("\n[bench] interrupted; stopping servers", flush=True)
    finally:
        stop_systems(list(LIVE))
        results.data["meta"]["loadavg_at_end"] = os.getloadavg()
        results.save()
    if not args.no_plots:
        try:
            import plots

            for path in plots.render(out):
                print(f"[bench] plot {path}")
        except ImportError as exc:
            print(f"[bench] no plots ({exc}); pip install -r bench/requirements.txt", flush=True)
    if ok and not args.keep_tmp:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"[bench] kept {workdir}")
    print(f"[bench] wrote {results.path}\n[bench] tables: {sys.executable} bench/report.py {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

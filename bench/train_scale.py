"""Training scale benchmark: generate -> load -> point-in-time features -> fit + calibrate + evaluate.

Each size runs in its own subprocess, so its peak resident memory (``ru_maxrss``) is its own. The child times
the stages separately (``generate`` is timed around :func:`features.synthetic.generate`; ``load``, ``features``
and ``fit`` come from :func:`training.pipeline.train`'s own timings, ``fit`` being baseline + full LightGBM +
raw-column LightGBM + calibration + threshold + evaluation). A sampler thread reads the resident set every
0.2 s, so every stage also gets its own peak. CPU seconds of generate and of train are recorded too (on a busy
machine wall time includes waiting for a core). Training runs with ``TrainConfig(track=False)``: no MLflow run and
no registration (logging SHAP values and artifacts of a 10^7-row run is not part of this benchmark), no reviewer
outcomes from an audit store, ``num_threads=2``.

The growth exponent ``b`` of ``cost ~ rows**b`` is fitted by least squares on log(cost) vs log(rows) for every
domain with two or more sizes (time of each stage, total time and peak RSS).

    python -m bench.train_scale [--sizes finance:100000,customs:100000] [--huge] [--json out.json] [--md out.md]
    python -m bench.train_scale --merge a.json b.json --json all.json --md all.md   # one table of several runs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

DEFAULT_SIZES = [("finance", 100_000), ("finance", 1_000_000), ("customs", 100_000), ("customs", 1_000_000)]
HUGE = ("finance", 10_000_000)
FIT_STAGES = ("baseline", "lgbm_full", "lgbm_raw", "calibrate_evaluate")
STAGES = ("generate", "load", "features", "fit")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mib() -> float:
    """Current resident set of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Sampler(threading.Thread):
    """Samples the resident set every ``interval`` seconds: ``(perf_counter, MiB)`` pairs."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.samples, self._stop_event = interval, [], threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.perf_counter(), _rss_mib()))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.samples.append((time.perf_counter(), _rss_mib()))

    def peak(self, start: float, end: float) -> float:
        inside = [m for t, m in self.samples if start <= t <= end]
        return max(inside) if inside else float("nan")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (RSS {_rss_mib():,.0f} MiB, peak {_peak_mib():,.0f} MiB)",
          file=sys.stderr, flush=True)


def child(domain: str, rows: int, work: Path, seed: int, positive_rate: float, num_threads: int) -> dict:
    from features.synthetic import generate
    from training.pipeline import TrainConfig, train

    sampler = Sampler()
    sampler.start()
    out: dict = {"domain": domain, "rows": rows, "seed": seed, "positive_rate": positive_rate,
                 "num_threads": num_threads}
    _log(f"{domain} {rows:,}: generate")
    t0 = time.perf_counter()
    path = generate(domain, rows, seed=seed, out_dir=work / f"{domain}-{rows}", positive_rate=positive_rate,
                    progress=False)
    t1, cpu1 = time.perf_counter(), _cpu_s()
    _log(f"generated in {t1 - t0:.1f}s; train (load, features, fit)")
    config = TrainConfig(seed=seed, num_threads=num_threads, track=False, register=False, reviewer_outcomes=False,
                         quiet=True, feature_dtype="float32")
    result = train(domain, path, config=config)
    t2 = time.perf_counter()
    sampler.stop()
    timings = result.timings
    out["times_s"] = {
        "generate": t1 - t0, "load": timings["load"], "features": timings["features"],
        "fit": sum(timings[k] for k in FIT_STAGES),
    }
    out["times_s"]["total"] = sum(out["times_s"].values())
    out["train_timings_s"] = dict(timings)
    # CPU seconds (user + system, all threads): on a shared machine wall time also counts waiting for a core
    out["cpu_s"] = {"generate": cpu1, "train": _cpu_s() - cpu1}
    # stage boundaries: generate [t0, t1], then train's laps in order from t1
    bounds, clock = {"generate": (t0, t1)}, t1
    for name in ("load", "features", *FIT_STAGES):
        bounds[name] = (clock, clock + timings[name])
        clock += timings[name]
    bounds["fit"] = (bounds["baseline"][0], t2)  # includes building TrainResult (data fingerprint)
    out["stage_peak_rss_mib"] = {s: sampler.peak(*bounds[s]) for s in STAGES}
    out["peak_rss_mib"] = _peak_mib()
    out["features"] = int(result.features.shape[1])
    out["feature_frame_mib"] = float(result.features.memory_usage(deep=False).sum() / 2**20)
    out["trees"] = int(result.lgbm.best_iteration)
    out["lgbm"] = {k: result.lgbm.params.get(k) for k in ("num_leaves", "max_depth", "max_bin", "learning_rate")}
    out["labelled"] = int(sum(len(v) for v in result.split.windows.values()))
    out["test_pr_auc"] = float(result.models["full"].metrics["test"]["pr_auc"])
    out["test_roc_auc"] = float(result.models["full"].metrics["test"]["roc_auc"])
    _log(f"done in {t2 - t0:.1f}s")
    return out


def run_child(domain: str, rows: int, work: Path, args) -> dict:
    cmd = [sys.executable, "-m", "bench.train_scale", "--child", domain, str(rows), str(work), str(args.seed),
           str(args.positive_rate), str(args.num_threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout, _ = proc.communicate()  # the child's stderr (stage log) goes straight to ours
    if proc.returncode != 0:
        raise RuntimeError(f"child {domain} {rows} failed with exit code {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1])


def exponent(rows: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) on log(rows) (None for fewer than two sizes)."""
    if len(set(rows)) < 2:
        return None
    return float(np.polyfit(np.log(rows), np.log(values), 1)[0])


def exponents(results: list[dict]) -> dict[str, dict[str, float | None]]:
    out = {}
    for domain in sorted({r["domain"] for r in results}):
        rs = [r for r in results if r["domain"] == domain]
        rows = [r["rows"] for r in rs]
        out[domain] = {s: exponent(rows, [r["times_s"][s] for r in rs]) for s in (*STAGES, "total")}
        out[domain]["peak_rss"] = exponent(rows, [r["peak_rss_mib"] for r in rs])
    return out


def markdown(results: list[dict], fits: dict) -> str:
    lines = ["| domain | rows | generate (s) | load (s) | features (s) | fit+calibrate+evaluate (s) | total (s) | "
             "peak RSS (MiB) | RSS peak in features (MiB) | trees | test PR-AUC |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        t = r["times_s"]
        lines.append(f"| {r['domain']} | {r['rows']:,} | {t['generate']:.1f} | {t['load']:.1f} | {t['features']:.1f} "
                     f"| {t['fit']:.1f} | {t['total']:.1f} | {r['peak_rss_mib']:,.0f} | "
                     f"{r['stage_peak_rss_mib']['features']:,.0f} | {r['trees']} | {r['test_pr_auc']:.3f} |")
    lines += ["", "Growth exponent b of cost ~ rows^b (least squares on log-log):", "",
              "| domain | generate | load | features | fit | total time | peak RSS |",
              "|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(v):
        return "–" if v is None else f"{v:.2f}"

    for domain, f in fits.items():
        lines.append(f"| {domain} | {fmt(f['generate'])} | {fmt(f['load'])} | {fmt(f['features'])} | {fmt(f['fit'])} "
                     f"| {fmt(f['total'])} | {fmt(f['peak_rss'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None,
                        help="domain:rows,... (default finance and customs at 10^5 and 10^6)")
    parser.add_argument("--huge", action="store_true", help="add finance 10^7 (hours on 2 cores, ~13 GiB)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--positive-rate", type=float, default=0.03)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="where the generated data goes (default: temp)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="no runs: combine the results of earlier --json files (table and exponents)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        domain, rows, work, seed, rate, threads = args.child
        print(json.dumps(child(domain, int(rows), Path(work), int(seed), float(rate), int(threads))))
        return 0
    from bench.common import machine, write_json

    if args.merge:
        runs = [json.loads(path.read_text()) for path in args.merge]
        results = sorted((r for run in runs for r in run["results"]), key=lambda r: (r["domain"], r["rows"]))
        fits = exponents(results)
        table = markdown(results, fits)
        print(table)
        if args.md:
            args.md.write_text(table)
        write_json(args.json, {"machines": [run["machine"] for run in runs], "results": results, "exponents": fits})
        return 0

    sizes = ([(d, int(n)) for d, n in (s.split(":") for s in args.sizes.split(","))] if args.sizes
             else list(DEFAULT_SIZES))
    if args.huge:
        sizes.append(HUGE)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="riskscore-trainscale-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for domain, rows in sizes:
            r = run_child(domain, rows, work, args)
            results.append(r)
            t = r["times_s"]
            print(f"{domain} {rows:>10,}: generate {t['generate']:.1f}s load {t['load']:.1f}s features "
                  f"{t['features']:.1f}s fit {t['fit']:.1f}s total {t['total']:.1f}s, peak RSS "
                  f"{r['peak_rss_mib']:,.0f} MiB", flush=True)
            if args.work is None:  # keep the temp disk use to one size at a time
                import shutil

                shutil.rmtree(work / f"{domain}-{rows}", ignore_errors=True)
    fits = exponents(results)
    table = markdown(results, fits)
    print(table)
    if args.md:
        args.md.write_text(table)
    write_json(args.json, {"machine": machine(), "results": results, "exponents": fits})
    return 0


if __name__ == "__main__":
    sys.exit(main())

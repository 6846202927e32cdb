"""Feature build benchmark: generate -> load -> point-in-time features (time, peak RSS), and the online cost.

Each case runs in its own subprocess so its peak resident memory (``ru_maxrss``) is its own:

* ``build``: ``generate`` + ``load_dataset`` + ``FeatureSet.build`` for finance 10^5 and 10^6 rows and customs
  10^5 rows (``--huge`` adds finance 10^7; not run by default);
* ``online``: the online state seeded with ``--history`` prior finance transactions (default 10^6), then the
  per-item feature cost of new transactions, one at a time: the serving path
  (:func:`serving.fast_path.feature_columns_in_time_order` on the item's plain columns, as the service passes
  them: features + ingest), ``OnlineFeatures.features``
  alone (pandas per call), and the previous serving step (``features`` + ``ingest`` per item).

    python -m bench.feature_build [--cases build,online] [--huge] [--history 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BUILD_CASES = [("finance", 100_000), ("customs", 100_000), ("finance", 1_000_000)]
HUGE = ("finance", 10_000_000)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_build(domain: str, rows: int, work: Path) -> dict:
    from features.datasets import load_dataset
    from features.domains import events_of, feature_set
    from features.synthetic import generate

    out: dict = {"case": "build", "domain": domain, "rows": rows}
    started = time.perf_counter()
    path = generate(domain, rows, seed=1, out_dir=work / f"{domain}-{rows}", positive_rate=0.08, progress=False)
    out["generate_s"] = time.perf_counter() - started
    started = time.perf_counter()
    data = load_dataset(domain, path)
    events = events_of(data)
    out["load_s"] = time.perf_counter() - started
    out["rss_after_load_mib"] = _rss_mib()
    started = time.perf_counter()
    feats = feature_set(domain).build(events, getattr(data, "cases", None))
    out["features_s"] = time.perf_counter() - started
    out["features"] = feats.shape[1]
    out["rows_per_s"] = rows / out["features_s"]
    out["peak_rss_mib"] = _rss_mib()
    return out


def child_online(history: int, items: int, work: Path) -> dict:
    import copy

    from bench.common import api_items
    from features.datasets import load_dataset
    from features.domains import events_of, feature_set
    from features.synthetic import generate
    from serving.fast_path import feature_columns_in_time_order
    from serving.models import item_columns, parse_batch
    from serving.scorer import freeze_heap

    path = generate("finance", history + items, seed=2, out_dir=work / f"online-{history}", positive_rate=0.08,
                    progress=False)
    data = load_dataset("finance", path)
    events = events_of(data)
    hist, new = events.iloc[:history], events.iloc[history:].drop(columns=["is_laundering"]).reset_index(drop=True)
    fs = feature_set("finance")
    out: dict = {"case": "online", "domain": "finance", "history": len(hist), "items": len(new)}
    rss0 = _rss_mib()
    started = time.perf_counter()
    state = fs.online(hist, getattr(data, "cases", None))
    out["seed_s"] = time.perf_counter() - started
    out["seed_rss_growth_mib"] = _rss_mib() - rss0
    twin = copy.deepcopy(state)
    freeze_heap()  # as the service does once its state is loaded (serving.scorer.freeze_heap)

    def per_item(fn, n: int, plain: bool = False) -> dict:
        times = []
        if plain:  # what the service passes: validated items as plain contract columns (serving.models)
            batch = parse_batch("finance", {"items": api_items("finance", new.iloc[:n])}, limit=n)
            rows = [item_columns("finance", [item]) for item in batch]
        else:
            rows = [new.iloc[i : i + 1] for i in range(n)]
        cpu = time.process_time()
        for row in rows:
            started = time.perf_counter()
            fn(row)
            times.append(time.perf_counter() - started)
        cpu_ms = (time.process_time() - cpu) / n * 1e3  # CPU per item: less sensitive to a busy machine
        a = np.asarray(times) * 1e3
        return {"n": n, "mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)),
                "p99_ms": float(np.percentile(a, 99)), "cpu_ms_per_item": cpu_ms}

    out["serving_features_and_ingest"] = per_item(lambda row: feature_columns_in_time_order(state, row), len(new),
                                                  plain=True)
    out["online_features_only"] = per_item(lambda row: twin.features(row), min(len(new), 300))

    def old(row):
        twin.features(row)
        twin.ingest(row)

    out["previous_features_and_ingest"] = per_item(old, min(len(new), 300))
    out["peak_rss_mib"] = _rss_mib()
    return out


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.feature_build", "--child", *args], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="build,online")
    parser.add_argument("--sizes", default=None, help="build cases as domain:rows,... (default: the three above)")
    parser.add_argument("--huge", action="store_true", help="add finance 10^7 rows (minutes, several GiB)")
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        kind, *rest = args.child
        work = Path(rest[-1])
        result = (child_build(rest[0], int(rest[1]), work) if kind == "build"
                  else child_online(int(rest[0]), int(rest[1]), work))
        print(json.dumps(result))
        return 0
    from bench.common import machine, write_json

    cases = [c.strip() for c in args.cases.split(",")]
    sizes = ([(d, int(n)) for d, n in (s.split(":") for s in args.sizes.split(","))] if args.sizes
             else list(BUILD_CASES))
    if args.huge:
        sizes.append(HUGE)
    results = []
    with tempfile.TemporaryDirectory(prefix="riskscore-featbench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "build" in cases:
            for domain, rows in sizes:
                r = run_child(["build", domain, str(rows), str(work)])
                results.append(r)
                print(f"build {domain} {rows:>10,}: generate {r['generate_s']:.1f}s load {r['load_s']:.1f}s "
                      f"features {r['features_s']:.1f}s ({r['rows_per_s']:,.0f} rows/s), peak RSS "
                      f"{r['peak_rss_mib']:,.0f} MiB", flush=True)
        if "online" in cases:
            r = run_child(["online", str(args.history), str(args.items), str(work)])
            results.append(r)
            s = r["serving_features_and_ingest"]
            print(f"online finance, {r['history']:,} history: seed {r['seed_s']:.1f}s "
                  f"(+{r['seed_rss_growth_mib']:,.0f} MiB); per item features+ingest p50 {s['p50_ms']:.3f} ms "
                  f"p99 {s['p99_ms']:.3f} ms; "
                  f"OnlineFeatures.features p50 {r['online_features_only']['p50_ms']:.3f} ms; previous "
                  f"features+ingest p50 {r['previous_features_and_ingest']['p50_ms']:.3f} ms", flush=True)
    write_json(args.json, {"machine": machine(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Feature build: pandas (``FeatureSet.build``) vs Dask (``features.dask_engine.build``) on one machine.

Generates (or reads) synthetic events, builds the point-in-time features both ways, checks that the two
frames are identical and prints a Markdown table of wall times.

    python bench/dask_bench.py --domain finance --rows 1000000 --workers 2
    python bench/dask_bench.py --data DIR --scheduler tcp://host:8786   # an existing cluster

The scheduler's workers must be able to import this project (install it on them).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="finance", choices=("customs", "finance"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="existing dataset directory (default: generate --rows into a temp dir)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (1 thread each)")
    parser.add_argument("--scheduler", help="address of an existing scheduler instead of a LocalCluster")
    parser.add_argument("--partitions", type=int, help="row partitions / hash buckets (default: 2 x workers)")
    parser.add_argument("--time-parts", type=int, default=1)
    parser.add_argument("--mode", default="hybrid", choices=("hybrid", "time"))
    parser.add_argument("--skip-pandas", action="store_true", help="time the Dask build only (no equality check)")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from features import dask_engine
    from features.datasets import load_dataset
    from features.domains import events_of, feature_set
    from features.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.data) if args.data else generate(args.domain, args.rows, args.seed, Path(tmp) / "data",
                                                          progress=False)
        t = time.perf_counter()
        data = load_dataset(args.domain, path, None)
        events = events_of(data)
        print(f"loaded {len(events):,} {args.domain} events in {time.perf_counter() - t:.1f}s")
    fs = feature_set(args.domain)
    rows: list[tuple[str, float]] = []
    ref = None
    if not args.skip_pandas:
        t = time.perf_counter()
        ref = fs.build(events, data.cases)
        rows.append(("pandas FeatureSet.build (1 process)", time.perf_counter() - t))
        print(f"pandas: {rows[-1][1]:.1f}s")

    if args.scheduler:
        client = Client(args.scheduler)
        cluster = None
        where = f"scheduler {args.scheduler}"
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
        where = f"LocalCluster {args.workers} workers x 1 thread (processes)"
    workers = len(client.scheduler_info()["workers"])
    partitions = args.partitions or 2 * workers
    try:
        t = time.perf_counter()
        out = dask_engine.build(fs, events, data.cases, partitions=partitions, time_parts=args.time_parts,
                                mode=args.mode, client=client)
        rows.append((f"Dask build, {where}, {partitions} partitions, mode={args.mode}, "
                     f"time_parts={args.time_parts}", time.perf_counter() - t))
        print(f"dask: {rows[-1][1]:.1f}s")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    if ref is not None:
        pd.testing.assert_frame_equal(out, ref, check_exact=True)
        print(f"identical: {out.shape[0]:,} rows x {out.shape[1]} features")

    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}\n")
    print("| build | seconds | rows/s |\n|---|---:|---:|")
    for name, sec in rows:
        print(f"| {name} | {sec:.1f} | {len(events) / sec:,.0f} |")


if __name__ == "__main__":
    main()

"""Quick regression guard (seconds): in-process scoring vs the raw LightGBM ceiling, measured in the same run.

For each domain: small synthetic data, a small LightGBM bundle, the online state seeded with all but the last
``--items`` events, then the serving path (:func:`serving.fast_path.feature_columns_in_time_order` on the items'
plain contract columns, as the service passes them, + ``explain``) on those items as one batch and one by one,
next to raw ``booster.predict`` + ``predict(pred_contrib=True)`` on the same feature matrix. It also checks
correctness: the served features equal the batch feature build (training semantics) and the explanations equal
``ModelBundle.explain``. With ``--idle-ms T`` the single items are also timed after ``T`` ms of sleep and after
``T`` ms of busy-waiting each (how much slower the same work is when it starts cold, as a request to an idle server).

Fails (exit 1) only on gross regressions relative to the ceiling, never on absolute times:
batch throughput < ``--min-ratio`` (default 5%) of raw predict+pred_contrib.

    python -m bench.quick [--items 200] [--min-ratio 0.05] [--idle-ms 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import api_items, dataset, events_and_cases, machine, quick_bundle, write_json

ROWS = {"customs": 3000, "finance": 4000}


def _same_features(a: pd.DataFrame, b: pd.DataFrame, categorical: list[str]) -> str | None:
    """None if equal (numbers to 1e-9), else the first differing column."""
    for col in a.columns:
        if col in categorical:
            if a[col].astype(object).fillna("<na>").tolist() != b[col].astype(object).fillna("<na>").tolist():
                return col
        elif not np.allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-9, atol=1e-9, equal_nan=True):
            return col
    return None


def _best(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (less noise from neighbours on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _spin(seconds: float) -> None:
    """Busy-wait (the CPU stays awake, unlike ``time.sleep``)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run_domain(domain: str, items: int, work: Path, repeats: int = 3, idle_ms: float = 0.0) -> dict:
    from features.domains import feature_set
    from serving.fast_path import (
        contrib_threads,
        explain,
        feature_columns_in_time_order,
        features_in_time_order,
        model_array,
    )
    from serving.models import item_columns, parse_batch

    events, cases = events_and_cases(domain, dataset(domain, ROWS[domain], work))
    hist, new = events.iloc[:-items], events.iloc[-items:]
    bundle = quick_bundle(domain, hist, cases)
    fs = feature_set(domain)
    seeded = fs.online(hist, cases)
    frame = new.drop(columns=[fs.label_col]).reset_index(drop=True)

    # correctness: serving == batch build with the new events unlabelled; explain == ModelBundle.explain
    feats = features_in_time_order(copy.deepcopy(seeded), frame)
    masked = events.copy()
    masked.loc[new.index, fs.label_col] = pd.NA
    expected = fs.build(masked, cases).loc[new.index].reset_index(drop=True)
    diff = _same_features(feats, expected, fs.categorical)
    ours, ref = explain(bundle, {c: feats[c].to_numpy() for c in feats.columns}), bundle.explain(feats)
    explain_ok = all(a.score == b.score and a.contributions == b.contributions and a.reasons == b.reasons
                     for a, b in zip(ours, ref, strict=True))

    # timings (best of `repeats`, each on a fresh copy of the seeded state)
    X = model_array(bundle, feats)
    nt = contrib_threads(len(X))  # the thread count serving uses for this size
    raw = _best(lambda: (bundle.booster.predict(X, num_threads=nt),
                         bundle.booster.predict(X, pred_contrib=True, num_threads=nt)), repeats)

    # timed inputs as the service passes them: validated items as plain contract columns (serving.models)
    validated = parse_batch(domain, {"items": api_items(domain, frame)}, limit=len(frame))
    columns = item_columns(domain, validated)

    def batch():
        state = copy.deepcopy(seeded)
        start = time.perf_counter()
        explain(bundle, feature_columns_in_time_order(state, columns))
        return time.perf_counter() - start

    served = min(batch() for _ in range(repeats))

    def one_by_one(chosen: list, pause: Callable[[float], None] | None = None) -> list[float]:
        """Seconds per item, scored one by one on a fresh copy of the seeded state, each after ``pause``."""
        state, times = copy.deepcopy(seeded), []
        for item in chosen:
            if pause is not None:
                pause(idle_ms / 1000)
            start = time.perf_counter()
            explain(bundle, feature_columns_in_time_order(state, item_columns(domain, [item])))
            times.append(time.perf_counter() - start)
        return times

    singles = one_by_one(validated[: min(items, 100)])
    idle = {}
    if idle_ms > 0:
        for name, pause in (("sleep", time.sleep), ("busy", _spin)):
            times = one_by_one(validated[: min(items, 100)], pause)
            idle[f"single_after_{name}_p50_ms"] = float(np.percentile(times, 50) * 1e3)
            idle[f"single_after_{name}_p99_ms"] = float(np.percentile(times, 99) * 1e3)
    raw_single = _best(lambda: (bundle.booster.predict(X[:1], num_threads=1),
                                bundle.booster.predict(X[:1], pred_contrib=True, num_threads=1)), 20)
    return {
        "domain": domain, "items": items, "history_events": len(hist), "trees": bundle.booster.num_trees(),
        "features_match_batch_build": diff is None, "first_differing_feature": diff, "explain_matches": explain_ok,
        "raw_items_per_s": items / raw, "served_items_per_s": items / served, "batch_ratio": raw / served,
        "single_p50_ms": float(np.percentile(singles, 50) * 1e3),
        "single_p99_ms": float(np.percentile(singles, 99) * 1e3),
        "raw_single_ms": raw_single * 1e3, **idle,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--min-ratio", type=float, default=0.05)
    parser.add_argument("--domains", default="customs,finance")
    parser.add_argument("--idle-ms", type=float, default=0.0,
                        help="also time single items after this many ms of sleep and of busy-waiting each")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="riskscore-quick-") as tmp:
        work = args.work or Path(tmp)
        results = [run_domain(d.strip(), args.items, work, idle_ms=args.idle_ms) for d in args.domains.split(",")]
    failures = []
    print(f"{'domain':8} {'raw items/s':>12} {'served items/s':>15} {'ratio':>6} {'single p50/p99 ms':>18} "
          f"{'raw single ms':>13}  parity")
    for r in results:
        print(f"{r['domain']:8} {r['raw_items_per_s']:12.0f} {r['served_items_per_s']:15.0f} {r['batch_ratio']:6.2f} "
              f"{r['single_p50_ms']:8.2f}/{r['single_p99_ms']:<9.2f} {r['raw_single_ms']:13.2f}  "
              f"{'ok' if r['features_match_batch_build'] and r['explain_matches'] else 'MISMATCH'}")
        if args.idle_ms > 0:
            print(f"{'':8} single p50/p99 ms after {args.idle_ms:g} ms of sleep {r['single_after_sleep_p50_ms']:.2f}/"
                  f"{r['single_after_sleep_p99_ms']:.2f}, of busy-waiting {r['single_after_busy_p50_ms']:.2f}/"
                  f"{r['single_after_busy_p99_ms']:.2f}")
        if not r["features_match_batch_build"]:
            failures.append(f"{r['domain']}: served feature {r['first_differing_feature']!r} "
                            "differs from the batch build")
        if not r["explain_matches"]:
            failures.append(f"{r['domain']}: explanations differ from ModelBundle.explain")
        if r["batch_ratio"] < args.min_ratio:
            failures.append(f"{r['domain']}: batch throughput is {r['batch_ratio']:.1%} of raw predict+pred_contrib "
                            f"(< {args.min_ratio:.0%})")
    write_json(args.json, {"machine": machine(), "results": results, "failures": failures})
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

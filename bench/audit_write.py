"""Audit write latency: one scored item per commit, SQLite's automatic WAL checkpoints against the service's
background checkpoints (:class:`serving.audit.WalCheckpointer`); and what the shared rate limit adds per request
(:meth:`serving.usage.SharedUsage.follow`), next to the commit it accompanies; and the record of an accepted read
(:meth:`serving.usage.SharedUsage.record`, one ``key_requests`` row); and commits of two processes writing to one
store at once, back to back (the service's workers and replicas; they take turns through
:class:`serving.audit.WriteLock`).

Each commit writes a request row and a score row the size of a finance item (81 features and 81 SHAP
contributions as JSON) into a fresh SQLite store in a temporary directory. The rate-limit check is timed with
nothing new in the store (one worker) and after another process committed one request (charged to its key); the
read's record is one commit of one small row.

    python -m bench.audit_write [--commits 6000] [--json out.json]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import machine, percentiles, write_json

FEATURES = {f"feature_{i}": float(i) * 1.37 for i in range(81)}


def _rows(request_id: str) -> tuple[dict, list[dict]]:
    from serving.audit import utcnow

    request = {"request_id": request_id, "created_at": utcnow(), "domain": "finance", "caller_key_id": "k1",
               "agency": "FIU", "idempotency_key": None, "body_sha256": "0" * 64, "items": 1}
    row = {"score_id": str(uuid.uuid4()), "request_id": request_id, "item_index": 0, "created_at": utcnow(),
           "domain": "finance", "event_id": request_id, "caller_key_id": "k1", "agency": "FIU",
           "model_name": "riskscore-finance", "model_version": "1", "input_json": {"amount": 9500.0},
           "features_json": FEATURES, "score": 0.5, "band": "medium", "flagged": False, "threshold": 0.7,
           "explanation_json": {"base_value": 0.1, "raw_margin": 0.2, "reasons": [], "contributions": FEATURES}}
    return request, [row]


def _timed_commits(store, commits: int) -> list[float]:
    """Seconds of each of ``commits`` one-item scoring commits to ``store``."""
    times = []
    for _ in range(commits):
        request, rows = _rows(uuid.uuid4().hex)
        started = time.perf_counter()
        store.record_scores(request, rows, {"items": [{"score": 0.5}]})
        times.append(time.perf_counter() - started)
    return times


def run(background: bool, commits: int) -> dict:
    from serving.audit import AuditStore

    with tempfile.TemporaryDirectory(prefix="riskscore-audit-") as tmp:
        store = AuditStore(f"sqlite:///{Path(tmp) / 'audit.db'}", background_checkpoint=background)
        times = _timed_commits(store, commits)
        store.close()
    out = percentiles(times)
    out["over_5ms"] = sum(t > 0.005 for t in times)
    return out


def _writer(url: str, commits: int, start, out) -> None:
    from serving.audit import AuditStore

    store = AuditStore(url, background_checkpoint=True)
    start.wait()
    times = _timed_commits(store, commits)
    store.close()
    out.put(times)


def contended(commits: int, writers: int = 2) -> dict:
    """Commit latency of ``writers`` processes writing to one store at the same time, back to back."""
    from serving.audit import AuditStore

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="riskscore-audit-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'audit.db'}"
        AuditStore(url).close()  # the tables, before the writers start
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(url, commits // writers, start, out)) for _ in range(writers)]
        for proc in procs:
            proc.start()
        start.set()
        times = [t for _ in procs for t in out.get(timeout=600)]
        for proc in procs:
            proc.join(timeout=60)
    result = percentiles(times)
    result["over_5ms"] = sum(t > 0.005 for t in times)
    result["writers"] = writers
    return result


def shared_usage(commits: int) -> dict:
    """``SharedUsage.follow`` per request: idle, and after each commit of another process (both in ms)."""
    from serving import auth
    from serving.audit import AuditStore
    from serving.usage import SharedUsage

    keys = auth.KeyStore([auth.KeyEntry(sha256="0" * 64, role="financial", agency="FIU", id="k1")], "bench")
    with tempfile.TemporaryDirectory(prefix="riskscore-audit-") as tmp:
        store = AuditStore(f"sqlite:///{Path(tmp) / 'audit.db'}", background_checkpoint=True)
        usage = SharedUsage(store, auth.RateLimiter(rate=1e9, burst=1e9), lambda: keys)
        idle, charged, commit, recorded = [], [], [], []
        caller = keys.caller("k1")
        for _ in range(commits):
            started = time.perf_counter()
            usage.follow()
            idle.append(time.perf_counter() - started)
            request, rows = _rows(uuid.uuid4().hex)  # another worker's request: not marked in this cursor
            started = time.perf_counter()
            store.record_scores(request, rows, {"items": [{"score": 0.5}]})
            commit.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert usage.follow() == 1
            charged.append(time.perf_counter() - started)
            started = time.perf_counter()
            usage.record(caller, uuid.uuid4().hex, "GET", "/scores/" + rows[0]["score_id"])
            recorded.append(time.perf_counter() - started)
        store.close()
    return {"idle": percentiles(idle), "after_one_request": percentiles(charged), "commit": percentiles(commit),
            "read_record": percentiles(recorded)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=6000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {"machine": machine(), "commits": args.commits}
    for name, background in (("automatic", False), ("background", True)):
        r = results[name] = run(background, args.commits)
        print(f"{name} checkpoints: p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms max {r['max_ms']:.1f} ms, "
              f"{r['over_5ms']} commits over 5 ms", flush=True)
    c = results["two_writers"] = contended(args.commits)
    print(f"two processes writing at once: p50 {c['p50_ms']:.2f} ms p99 {c['p99_ms']:.2f} ms max {c['max_ms']:.1f} ms, "
          f"{c['over_5ms']} commits over 5 ms", flush=True)
    u = results["shared_rate_limit"] = shared_usage(min(args.commits, 2000))
    print(f"shared rate limit check: nothing new p50 {u['idle']['p50_ms'] * 1000:.0f} us, after another process's "
          f"request p50 {u['after_one_request']['p50_ms'] * 1000:.0f} us p99 {u['after_one_request']['p99_ms']:.2f} ms "
          f"(that request's commit: p50 {u['commit']['p50_ms'] * 1000:.0f} us); record of an accepted read: "
          f"p50 {u['read_record']['p50_ms'] * 1000:.0f} us p99 {u['read_record']['p99_ms']:.2f} ms", flush=True)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

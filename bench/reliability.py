"""No lost scores: the long version of the reliability tests (default 20 clients x 30 s, then kill -9 + restart).

Trains both domains on small synthetic data into a temporary MLflow registry, starts the real BentoML server
on 127.0.0.1 (the helpers of ``tests/test_service.py``) and runs the load clients of
``tests/test_reliability.py``:

1. steady load: every client posts 1-3 items per request with a unique Idempotency-Key (every 10th request
   is invalid on purpose) for ``--seconds``; then every returned score id must have exactly one audit row and
   every audit row must have been returned (lost = 0);
2. kill and restart: the same load, ``kill -9`` of the server and its worker after ``--kill-after`` seconds,
   a restart, and a retry of every request that got a transport error with its Idempotency-Key; the audit must
   have no torn request, no duplicate score id, and exactly the returned scores.

    .venv/bin/python bench/reliability.py                      # 20 clients x 30 s, kill after 10 s
    .venv/bin/python bench/reliability.py --clients 8 --seconds 5 --out -   # quick look, print only
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from serving import auth  # noqa: E402
from tests.test_reliability import LoadResult, audit_check, kill_tree, retry_failed, run_load  # noqa: E402
from tests.test_service import ROWS, Server, _events, _free_port, _train, launch, wait_ready  # noqa: E402


def setup(root: Path, clients: int) -> tuple[Server, list[tuple[str, str]]]:
    """Data, two trained champions, keys (``clients`` load keys without rate limit + admin) and a running server."""
    from features.synthetic import generate

    home = root / "home"
    env = {**os.environ, "RISKSCORE_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "RISKSCORE_ARTIFACT_ROOT": (root / "artifacts").as_uri(), "RISKSCORE_KEYS_FILE": str(root / "keys.json"),
           "RISKSCORE_DOMAINS": "customs,finance", "BENTOML_HOME": str(root / "bentoml"), "PYTHONUNBUFFERED": "1"}
    env.pop("RISKSCORE_AUDIT_URL", None)
    for key in ("RISKSCORE_HOME", "MLFLOW_TRACKING_URI", "RISKSCORE_ARTIFACT_ROOT", "RISKSCORE_KEYS_FILE"):
        os.environ[key] = env[key]
    data = {}
    for domain in ("customs", "finance"):
        print(f"training {domain} ...", flush=True)
        data[domain] = generate(domain, ROWS[domain], seed=1, out_dir=root / "data" / domain, positive_rate=0.08,
                                progress=False)
        _train(domain, data[domain], seed=0)
    keys = {("admin", "A"): auth.add_key("admin", "A", root / "keys.json")[0]}
    load = []
    for i in range(clients):
        domain = "customs" if i % 2 == 0 else "finance"
        role = "customs" if domain == "customs" else "financial"
        load.append((domain, auth.add_key(role, "L", root / "keys.json", rate=0)[0]))
    port, log = _free_port(), root / "server.log"
    proc = launch(env, log, port)
    server = Server(f"http://127.0.0.1:{port}", keys, env, home, log, data, proc)
    wait_ready(server.url, proc, log)
    return server, load


def summary(result: LoadResult) -> dict:
    counts = result.statuses()
    lat = np.array([s.seconds for s in result.sent if s.status is not None and not s.retried]) * 1000
    return {"sent": len(result.sent), "2xx": counts["2xx"], "4xx": counts["4xx"], "5xx": counts["5xx"],
            "transport_errors": counts["error"], "items_scored": len(result.score_ids()),
            "req_per_s": round(len(result.sent) / max(result.seconds, 1e-9), 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None}


def steady(server: Server, load: list, pools: dict, seconds: float) -> dict:
    tag = f"steady{time.time_ns()}"
    result = run_load(server.url, load, pools, seconds=seconds, tag=tag)
    audit = audit_check(server.home / "audit.db", tag)
    returned = result.score_ids()
    lost = len(set(returned) ^ set(audit["score_ids"]))
    return {**summary(result), "audit_rows": len(audit["score_ids"]), "lost": lost,
            "duplicate_score_ids": audit["duplicate_score_ids"], "torn_requests": audit["torn_requests"],
            "integrity": audit["integrity"], "ok": lost == 0 and len(returned) == len(set(returned))
            and counts_ok(result)}


def counts_ok(result: LoadResult) -> bool:
    return all(s.status == (200 if s.valid else 422) for s in result.sent)


def kill_restart(server: Server, load: list, pools: dict, seconds: float, kill_after: float) -> tuple[dict, Server]:
    tag, stop, box = f"kill{time.time_ns()}", threading.Event(), {}
    loader = threading.Thread(target=lambda: box.setdefault("r", run_load(server.url, load, pools, seconds=seconds,
                                                                          tag=tag, stop=stop)))
    loader.start()
    time.sleep(kill_after)
    kill_tree(server.proc)
    time.sleep(0.5)
    stop.set()
    loader.join()
    result: LoadResult = box["r"]
    before = summary(result)
    started = time.monotonic()
    port = _free_port()
    proc = launch(server.env, server.log, port)
    restarted = Server(f"http://127.0.0.1:{port}", server.keys, server.env, server.home, server.log, server.data,
                       proc)
    wait_ready(restarted.url, proc, server.log)
    restart_s = time.monotonic() - started
    after_kill = audit_check(server.home / "audit.db", tag)
    seen_before = set(result.score_ids())
    replayed = retry_failed(restarted.url, result)
    final = audit_check(server.home / "audit.db", tag)
    returned = result.score_ids()
    consistent = (after_kill["integrity"] == "ok" and after_kill["torn_requests"] == 0
                  and after_kill["duplicate_score_ids"] == 0 and after_kill["orphan_scores"] == 0
                  and seen_before <= set(after_kill["score_ids"]) and len(returned) == len(set(returned))
                  and set(returned) == set(final["score_ids"]) and counts_ok(result))
    return ({**before, "restart_s": round(restart_s, 1), "retried": sum(s.retried for s in result.sent),
             "committed_but_unanswered": replayed, "audit_rows": len(final["score_ids"]),
             "lost": len(set(returned) ^ set(final["score_ids"])), "torn_requests": after_kill["torn_requests"],
             "duplicate_score_ids": final["duplicate_score_ids"], "integrity": after_kill["integrity"],
             "consistent": "yes" if consistent else "NO"}, restarted)


def markdown(args, steady_row: dict, kill_row: dict) -> str:
    def table(row: dict) -> str:
        return "| " + " | ".join(row) + " |\n|" + "---|" * len(row) + "\n| " + " | ".join(
            str(v) for v in row.values()) + " |\n"

    return (f"### {time.strftime('%Y-%m-%d')}: {args.clients} clients x {args.seconds:g} s "
            f"({platform.machine()}, {os.cpu_count()} cores shared, Python {platform.python_version()})\n\n"
            f"Command: `.venv/bin/python bench/reliability.py --clients {args.clients} --seconds {args.seconds:g} "
            f"--kill-after {args.kill_after:g}`\n\nSteady load:\n\n{table(steady_row)}\n"
            f"Kill -9 after {args.kill_after:g} s, restart, retry with the same Idempotency-Keys:\n\n"
            f"{table(kill_row)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--kill-after", type=float, default=10.0, help="seconds of load before kill -9")
    parser.add_argument("--out", default=str(REPO / "bench" / "reliability_results.md"),
                        help="Markdown file to append the results to ('-' = print only)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="riskscore-reliability-") as tmp:
        server, load = setup(Path(tmp), args.clients)
        try:
            pools = {d: _events(server, d, 60, start=100) for d in ("customs", "finance")}
            print("steady load ...", flush=True)
            steady_row = steady(server, load, pools, args.seconds)
            print(steady_row, flush=True)
            print("kill -9 and restart ...", flush=True)
            kill_row, server = kill_restart(server, load, pools, args.seconds, args.kill_after)
            print(kill_row, flush=True)
        finally:
            server.proc.terminate()
            server.proc.wait(timeout=60)
    text = markdown(args, steady_row, kill_row)
    print(text)
    if args.out != "-":
        with open(args.out, "a") as fh:
            fh.write("\n" + text)
    ok = steady_row["ok"] and kill_row["consistent"] == "yes"
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""Load test of the real BentoML server next to the raw LightGBM ceiling, in one run.

Trains both domains on synthetic data into a throw-away MLflow registry, starts
``python -m bentoml serve serving.service:RiskScore`` on a free 127.0.0.1 port (temporary home, audit store and
keys; rate limit off), then:

* single-item scoring: 1 user, ``--users`` users back to back (saturation: latency is queueing), and
  ``--users`` users each waiting ``--think-ms`` between requests (moderate load) post one item per request for
  ``--duration`` seconds -> p50/p90/p99 latency and requests/s. The users are ``wrk`` connections when
  ``wrk`` is installed (:mod:`bench.wrk_load`; a C client whose CPU does not compete with the server's like a
  Python client's), else Python threads with httpx (bounded by ``--max-requests``); ``--client`` chooses;
* every single-item point also records the CPU time the server's processes spent per request
  (``server_cpu_ms_per_request``, from ``/proc``): a request that reaches an idle server costs more CPU, not only
  more waiting; and, before any load, what an idle server costs (``server_idle_cpu_ms_per_s``, 5 s);
* optionally a latency-vs-load curve: ``--curve 1:0,2:30,4:30`` adds one single-item run per ``users:think_ms``
  point (same generator, same duration);
* ``--rate-limit R``: per worker count, a second server with the per-key rate limit on (rate and burst R, so
  nothing is refused): what checking the limit and charging other workers' requests costs;
* ``--workers 1,2``: one server per worker count, all started up front; every single-item load point runs
  against each of them in turn (same items, interleaved, so a slow phase of the machine hits all alike); the
  batch and in-process measurements use the first;
* batch scoring: ``--batches`` requests of ``--batch-size`` items (with explanations) -> items/s;
* the same items in-process: the serving path (:func:`serving.fast_path.feature_columns_in_time_order` +
  :func:`serving.fast_path.explain`) and raw ``booster.predict`` + ``predict(pred_contrib=True)`` on the same
  feature matrix (the ceiling), reported as ratios.

Items are the latest events of the training data with fresh ids, moved after the end of the history.

    python -m bench.serve_load [--customs-rows 10000] [--finance-rows 20000] [--users 4] [--think-ms 30]
                               [--duration 20] [--batch-size 1000] [--batches 3] [--client auto|wrk|python]
                               [--curve USERS:THINK_MS,...] [--workers 1,2] [--rate-limit R] [--compare-old]
                               [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pandas as pd

from bench import wrk_load
from bench.common import api_items, dataset, events_and_cases, machine, percentiles, write_json
from serving import local_server

REPO = Path(__file__).resolve().parents[1]
ROUTE = {"customs": "/score_shipments", "finance": "/score_transactions"}
ROLE = {"customs": "customs", "finance": "financial"}
TIME_COL = {"customs": "date", "finance": "timestamp"}
ID_COL = {"customs": "declaration_id", "finance": "transaction_id"}


def new_events(domain: str, events: pd.DataFrame, n: int, label_col: str) -> pd.DataFrame:
    """The latest ``n`` events with fresh ids, shifted to just after the history (relative times kept)."""
    tail = events.iloc[-n:].drop(columns=[label_col]).copy()
    col = TIME_COL[domain]
    shift = events[col].max() - tail[col].min() + pd.Timedelta(days=1)
    if domain == "customs":
        shift = pd.Timedelta(days=shift.days)
    tail[col] = tail[col] + shift
    tail[ID_COL[domain]] = [f"B{i}-{time.time_ns()}" for i in range(len(tail))]
    return tail.reset_index(drop=True)


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and all its descendants (Linux ``/proc``; 0.0
    elsewhere): the server's own cost of a load point, apart from the load generator's."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # gone, or not Linux
            continue
    return total


class Running:
    def __init__(self, url: str, keys: dict[str, str], proc: subprocess.Popen, log: Path):
        self.url, self.keys, self.proc, self.log = url, keys, proc, log

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


def train_models(root: Path, data: dict[str, Path], rounds: int | None) -> tuple[dict, dict, dict]:
    """Train both domains into a throw-away registry: ``(server env, bundles, keys by role)``."""
    from serving import auth
    from training.pipeline import TrainConfig, train

    env = {**os.environ, "RISKSCORE_HOME": str(root / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "RISKSCORE_ARTIFACT_ROOT": (root / "artifacts").as_uri(), "RISKSCORE_KEYS_FILE": str(root / "keys.json"),
           "RISKSCORE_DOMAINS": "customs,finance", "RISKSCORE_FAIL_FAST": "1", "RISKSCORE_RATE_LIMIT": "0",
           "BENTOML_HOME": str(root / "bentoml"), "PYTHONUNBUFFERED": "1"}
    env.pop("RISKSCORE_AUDIT_URL", None)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: env[k] for k in ("RISKSCORE_HOME", "MLFLOW_TRACKING_URI", "RISKSCORE_ARTIFACT_ROOT",
                                           "RISKSCORE_KEYS_FILE")})
    bundles, keys = {}, {}
    try:
        for domain, path in data.items():
            config = TrainConfig(seed=0, quiet=True, num_threads=1)
            if rounds:
                from dataclasses import replace

                config = replace(config, lgbm=replace(config.lgbm, num_boost_round=rounds))
            started = time.perf_counter()
            result = train(domain, path, config=config)
            took = time.perf_counter() - started
            print(f"trained {domain}: {result.bundle.booster.num_trees()} trees in {took:.0f}s", flush=True)
            bundles[domain] = result.bundle
        for role in ("customs", "financial"):
            keys[role] = auth.add_key(role, "BENCH", root / "keys.json")[0]
    finally:
        for k, v in saved.items():
            if k in ("RISKSCORE_HOME", "MLFLOW_TRACKING_URI", "RISKSCORE_ARTIFACT_ROOT", "RISKSCORE_KEYS_FILE"):
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return env, bundles, keys


def launch_server(root: Path, env: dict, keys: dict, workers: int = 1, rate_limit: float = 0.0) -> Running:
    """Start the service with ``workers`` worker processes on a free port and wait until it is ready; a
    ``rate_limit`` > 0 keeps the per-key limit on (its burst as large, so no request is refused)."""
    port = local_server.free_port()
    name = f"{workers}w" + ("-limited" if rate_limit else "")
    log = root / f"server-{name}.log"
    audit = f"sqlite:///{root / f'audit-{name}.db'}"  # one audit store per server: no cross-talk
    limits = {"RISKSCORE_RATE_LIMIT": f"{rate_limit:g}", "RISKSCORE_RATE_BURST": f"{rate_limit:g}"}
    proc = local_server.launch({**env, **limits, "RISKSCORE_WORKERS": str(workers), "RISKSCORE_AUDIT_URL": audit},
                               log, port, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        local_server.wait_ready(url, proc, log, timeout=300)
    except local_server.ServerStartError:
        local_server.stop(proc)
        raise
    return Running(url, keys, proc, log)


def start_server(root: Path, data: dict[str, Path], rounds: int | None, workers: int = 1) -> tuple[Running, dict]:
    """:func:`train_models` then :func:`launch_server`."""
    env, bundles, keys = train_models(root, data, rounds)
    return launch_server(root, env, keys, workers), bundles


def single_load(server: Running, domain: str, pool: list[dict], users: int, duration: float,
                max_requests: int, think_ms: float = 0.0) -> dict:
    """``users`` threads posting one item per request until ``duration`` s or ``max_requests`` in total, each
    waiting ``think_ms`` between a reply and its next request."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(max_requests))
    stop = time.monotonic() + duration

    def user() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while time.monotonic() < stop:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                item = dict(pool[i % len(pool)], **{ID_COL[domain]: f"S{i}-{time.time_ns()}"})
                started = time.perf_counter()
                r = client.post(ROUTE[domain], json={"items": [item]}, headers=server.headers(ROLE[domain]))
                elapsed = time.perf_counter() - started
                with lock:
                    (latencies if r.status_code == 200 else errors).append(elapsed if r.status_code == 200 else
                                                                          f"{r.status_code} {r.text[:200]}")
                if think_ms > 0:
                    time.sleep(think_ms / 1000)

    with httpx.Client(base_url=server.url, timeout=60) as warm:  # warm-up, not measured
        for i in range(5):
            item = dict(pool[i], **{ID_COL[domain]: f"W{i}-{time.time_ns()}"})
            warm.post(ROUTE[domain], json={"items": [item]}, headers=server.headers(ROLE[domain]))
    started = time.perf_counter()
    threads = [threading.Thread(target=user) for _ in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    out = {"users": users, "think_ms": think_ms, "client": "python", **percentiles(latencies),
           "requests_per_s": len(latencies) / wall, "errors": len(errors)}
    if errors:
        out["first_error"] = errors[0]
    return out


def batch_load(server: Running, domain: str, batches: list[list[dict]]) -> dict:
    times = []
    with httpx.Client(base_url=server.url, timeout=600) as client:
        for items in batches:
            started = time.perf_counter()
            r = client.post(ROUTE[domain], json={"items": items}, headers=server.headers(ROLE[domain]))
            times.append(time.perf_counter() - started)
            if r.status_code != 200:
                raise RuntimeError(f"batch request failed: {r.status_code} {r.text[:300]}")
            assert len(r.json()["items"]) == len(items) and r.json()["items"][0]["reasons"] is not None
    n = len(batches[0])
    return {"batch_size": n, "requests": len(times), "seconds": times, "items_per_s": n / min(times),
            "items_per_s_mean": n * len(times) / sum(times)}


def in_process(domain: str, bundle, events: pd.DataFrame, cases, frame: pd.DataFrame, compare_old: bool) -> dict:
    """Serving path in-process and raw LightGBM on the same matrix (best of 3)."""
    from features.domains import feature_set
    from serving.fast_path import contrib_threads, explain, feature_columns_in_time_order, model_array
    from serving.models import item_columns, parse_batch

    fs = feature_set(domain, bundle.label_delay_days)
    seeded = fs.online(events, cases)
    # what the service passes: validated items as plain contract columns (serving.models.item_columns)
    parsed = parse_batch(domain, {"items": api_items(domain, frame)}, limit=len(frame))
    batch_cols = item_columns(domain, parsed)
    out: dict = {}
    served = []
    for _ in range(3):
        state = copy.deepcopy(seeded)
        started = time.perf_counter()
        cols = feature_columns_in_time_order(state, batch_cols)
        feats_s = time.perf_counter() - started
        explain(bundle, cols)
        served.append((time.perf_counter() - started, feats_s))
    total, feats_s = min(served)
    X = model_array(bundle, cols)
    nt = contrib_threads(len(X))
    raw = []
    for _ in range(3):
        started = time.perf_counter()
        bundle.booster.predict(X, num_threads=nt)
        bundle.booster.predict(X, pred_contrib=True, num_threads=nt)
        raw.append(time.perf_counter() - started)
    single_raw, single_served = [], []
    state = copy.deepcopy(seeded)
    for i in range(min(len(frame), 200)):
        started = time.perf_counter()
        bundle.booster.predict(X[i : i + 1], num_threads=1)
        bundle.booster.predict(X[i : i + 1], pred_contrib=True, num_threads=1)
        single_raw.append(time.perf_counter() - started)
        started = time.perf_counter()
        explain(bundle, feature_columns_in_time_order(state, item_columns(domain, parsed[i : i + 1])))
        single_served.append(time.perf_counter() - started)
    n = len(frame)
    out.update({"items": n, "raw_items_per_s": n / min(raw), "served_items_per_s": n / total,
                "features_ms_per_item": feats_s / n * 1e3, "batch_ratio_vs_raw": min(raw) / total,
                "raw_single": percentiles(single_raw), "served_single": percentiles(single_served),
                "contrib_threads": nt})
    if compare_old:  # the previous path: pandas per distinct time + ModelBundle.explain
        state = copy.deepcopy(seeded)
        started = time.perf_counter()
        parts = []
        for _, group in frame.groupby(fs.time_col, sort=True):
            parts.append(state.features(group))
            state.ingest(group)
        bundle.explain(pd.concat(parts).loc[frame.index])
        out["old_items_per_s"] = n / (time.perf_counter() - started)
    return out


def _curve(text: str) -> list[tuple[int, float]]:
    """``"1:0,2:30"`` -> ``[(1, 0.0), (2, 30.0)]`` (users, mean think time in ms)."""
    try:
        points = [(int(u), float(t)) for u, t in (p.split(":") for p in text.split(",") if p.strip())]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use users:think_ms,... e.g. 1:0,2:30,4:30") from None
    if any(u < 1 or t < 0 for u, t in points):
        raise argparse.ArgumentTypeError(f"{text!r}: users >= 1 and think_ms >= 0")
    return points


def _workers(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``."""
    try:
        out = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated worker counts, e.g. 1,2") from None
    if not out or any(w < 1 for w in out) or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{text!r}: distinct worker counts >= 1")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customs-rows", type=int, default=10_000)
    parser.add_argument("--finance-rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=None, help="cap LightGBM boosting rounds (default: training's)")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of single-item load per domain")
    parser.add_argument("--think-ms", type=float, default=30.0,
                        help="moderate load: --users users each waiting this long between a reply and the next request")
    parser.add_argument("--max-requests", type=int, default=5_000)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                        help="single-item load generator: wrk (C, Debian package) or Python threads with httpx; "
                             "auto = wrk when installed")
    parser.add_argument("--curve", type=_curve, default=[],
                        help="extra single-item load points as users:think_ms,... (e.g. 1:30,2:30,4:30,4:60)")
    parser.add_argument("--workers", type=_workers, default=[1],
                        help="comma-separated worker counts per server, e.g. 1,2 (one server each, loads interleaved)")
    parser.add_argument("--rate-limit", type=float, default=0.0,
                        help="also start, per worker count, a server with the per-key rate limit on at this rate "
                             "(and burst): what the limit and its sharing across workers cost")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--compare-old", action="store_true", help="also time the previous in-process path")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = {"customs": args.customs_rows, "finance": args.finance_rows}
    use_wrk = args.client == "wrk" or (args.client == "auto" and wrk_load.available())
    if args.client == "wrk" and not wrk_load.available():
        parser.error("--client wrk: wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="riskscore-load-") as tmp:
        root = Path(tmp)
        work = args.work or root
        data = {d: dataset(d, n, work) for d, n in rows.items()}
        env, bundles, keys = train_models(root, data, args.rounds)
        servers: dict[str, Running] = {}
        results: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "domains": {}}
        try:
            for w in args.workers:
                servers[f"workers_{w}"] = launch_server(root, env, keys, w)
                if args.rate_limit > 0:
                    servers[f"workers_{w}_limited"] = launch_server(root, env, keys, w, args.rate_limit)
            server = next(iter(servers.values()))
            for name, srv in servers.items():  # what an idle server costs (background threads, event loop ticks)
                before, idle_s = server_cpu_s(srv.proc.pid), 5.0
                time.sleep(idle_s)
                results.setdefault("server_idle_cpu_ms_per_s", {})[name] = (
                    1000 * (server_cpu_s(srv.proc.pid) - before) / idle_s)
            for domain in ("customs", "finance"):
                events, cases = events_and_cases(domain, data[domain])
                label = "fraud" if domain == "customs" else "is_laundering"
                pool = new_events(domain, events, args.batch_size, label)
                items = api_items(domain, pool)
                res = {"history_events": len(events), "trees": bundles[domain].booster.num_trees()}
                res["in_process"] = in_process(domain, bundles[domain], events, cases, pool, args.compare_old)
                loads = [("single_1_user", 1, 0.0), ("single", args.users, 0.0),
                         ("single_paced", args.users, args.think_ms),
                         *((f"curve_{users}u_{think:g}ms", users, think) for users, think in args.curve)]
                for key, users, think in loads:
                    for name, srv in servers.items():  # interleaved: each point on every server in turn
                        cpu_before = server_cpu_s(srv.proc.pid)
                        if use_wrk:
                            point = wrk_load.run(srv.url, ROUTE[domain], srv.keys[ROLE[domain]], items,
                                                 ID_COL[domain], users, args.duration, think_ms=think)
                        else:
                            point = single_load(srv, domain, items, users, args.duration, args.max_requests,
                                                think_ms=think)
                        if point.get("n"):  # CPU the server spent per request (all its processes)
                            point["server_cpu_ms_per_request"] = (
                                1000 * (server_cpu_s(srv.proc.pid) - cpu_before) / point["n"])
                        if srv is server:
                            res[key] = point
                        else:
                            res.setdefault(name, {})[key] = point
                        if len(servers) > 1:
                            print(f"{domain}: {name}, {key}: {point['requests_per_s']:.0f} req/s, p50 "
                                  f"{point['p50_ms']:.1f} p99 {point['p99_ms']:.1f} ms", flush=True)
                batches = []
                for b in range(args.batches):  # each batch later than the previous one, fresh ids
                    shifted = new_events(domain, pd.concat([events, pool]), args.batch_size, label) if b else pool
                    pool = shifted
                    batches.append(api_items(domain, shifted))
                res["batch"] = batch_load(server, domain, batches)
                res["batch_ratio_http_vs_raw"] = res["batch"]["items_per_s"] / res["in_process"]["raw_items_per_s"]
                results["domains"][domain] = res
                for users, think in args.curve:
                    point = res[f"curve_{users}u_{think:g}ms"]
                    print(f"{domain}: {users} users, {think:g} ms think: {point['requests_per_s']:.0f} req/s, p50 "
                          f"{point['p50_ms']:.1f} p90 {point['p90_ms']:.1f} p99 {point['p99_ms']:.1f} ms, server CPU "
                          f"{point.get('server_cpu_ms_per_request', float('nan')):.2f} ms/request", flush=True)
                one, paced = res["single_1_user"], res["single_paced"]
                cpu = {k: res[k].get("server_cpu_ms_per_request", float("nan"))
                       for k in ("single_1_user", "single_paced")}
                print(f"{domain}: server CPU per request {cpu['single_1_user']:.2f} ms back to back, "
                      f"{cpu['single_paced']:.2f} ms with think times", flush=True)
                print(f"{domain}: single, 1 user: p50 {one['p50_ms']:.1f} ms p99 {one['p99_ms']:.1f} ms; "
                      f"{args.users} users with {args.think_ms:g} ms think time: p50 {paced['p50_ms']:.1f} ms "
                      f"p99 {paced['p99_ms']:.1f} ms ({paced['requests_per_s']:.0f} req/s); "
                      f"{args.users} users: p50 {res['single']['p50_ms']:.1f} ms p99 {res['single']['p99_ms']:.1f} ms "
                      f"({res['single']['requests_per_s']:.0f} req/s, {res['single']['errors']} errors); "
                      f"batch {res['batch']['items_per_s']:.0f} items/s over HTTP, "
                      f"{res['in_process']['served_items_per_s']:.0f} in-process, "
                      f"raw {res['in_process']['raw_items_per_s']:.0f} "
                      f"-> HTTP/raw {res['batch_ratio_http_vs_raw']:.2f}",
                      flush=True)
        finally:
            for srv in servers.values():
                local_server.stop(srv.proc)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

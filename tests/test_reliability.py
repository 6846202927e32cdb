"""Reliability and security of the scoring service: drift gauges, no lost scores under load and SIGKILL,
idempotent retries, hostile input over HTTP (hypothesis + schemathesis), model faults, rate limits and the
role x agency matrix.

Server tests reuse the module-scoped ``server`` fixture of ``tests/test_service.py`` (one real BentoML server
on 127.0.0.1 for this module); the SIGKILL test runs last because it kills and restarts that server. The
load helpers here are also what ``bench/reliability.py`` runs for longer (20 clients x 30 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import auth, local_server
from tests import test_service
from tests.test_properties import json_values
from tests.test_service import Server, _events, _free_port, launch, server_test, wait_ready

server = test_service.server  # the module-scoped fixture: one server for this module

ROUTES = {"customs": "/score_shipments", "finance": "/score_transactions"}
SCORER_ROLE = {"customs": "customs", "finance": "financial"}


def _env(server: Server, mp: pytest.MonkeyPatch) -> None:
    for key in ("RISKSCORE_HOME", "MLFLOW_TRACKING_URI", "RISKSCORE_ARTIFACT_ROOT", "RISKSCORE_KEYS_FILE"):
        mp.setenv(key, server.env[key])


def _add_keys(server: Server, specs: list[tuple[str, str]], rate: float | None = None,
              burst: float | None = None) -> list[str]:
    """New keys ``(role, agency)`` in the server's key file, picked up by a (cheap, non-forced) reload."""
    path = Path(server.env["RISKSCORE_KEYS_FILE"])
    keys = [auth.add_key(role, agency, path, rate=rate, burst=burst)[0] for role, agency in specs]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        r = c.post("/admin/reload", json={"domains": ["finance"]}, headers=server.headers("admin"))
    assert r.status_code == 200, r.text
    return keys


# ---------------------------------------------------------------------------------------------- load helpers


@dataclass
class Sent:
    """One request a load client sent: what, and what came back (a status or a transport error)."""

    domain: str
    key: str
    idempotency_key: str
    body: dict
    valid: bool
    status: int | None = None
    error: str | None = None
    response: dict | None = None
    retried: bool = False
    seconds: float = 0.0


@dataclass
class LoadResult:
    sent: list[Sent] = field(default_factory=list)
    seconds: float = 0.0

    def statuses(self) -> Counter:
        return Counter(("error" if s.status is None else f"{s.status // 100}xx") for s in self.sent)

    def score_ids(self) -> list[str]:
        return [i["score_id"] for s in self.sent if s.response and s.status == 200 for i in s.response["items"]]


def run_load(url: str, clients: list[tuple[str, str]], pools: dict[str, list[dict]], seconds: float, tag: str,
             stop: threading.Event | None = None, invalid_every: int = 10, max_requests: int = 100_000) -> LoadResult:
    """``clients`` (domain, key) threads posting 1-3 items (fresh ids starting with ``tag``) for ``seconds``.

    Every request carries a unique Idempotency-Key; every ``invalid_every``-th one is invalid (expects 422).
    Transport errors (server gone) are recorded, not raised; the loop is bounded by time and ``max_requests``.
    """
    stop = stop or threading.Event()
    result = LoadResult()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    id_col = {"customs": "declaration_id", "finance": "transaction_id"}

    def client(n: int, domain: str, key: str) -> None:
        pool = pools[domain]
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(max_requests):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                items = [dict(pool[(n * 7 + i * 3 + j) % len(pool)], **{id_col[domain]: f"{tag}-{n}-{i}-{j}"})
                         for j in range(1 + (n + i) % 3)]
                valid = invalid_every <= 0 or i % invalid_every != invalid_every - 1
                if not valid:
                    items[0] = dict(items[0], **({"net_mass": -1.0} if domain == "customs" else {"amount": -1.0}))
                sent = Sent(domain, key, f"{tag}-{n}-{i}", {"items": items}, valid)
                began = time.perf_counter()
                try:
                    r = c.post(ROUTES[domain], json=sent.body, headers={
                        "Authorization": f"Bearer {key}", "Idempotency-Key": sent.idempotency_key})
                    sent.status = r.status_code
                    sent.response = r.json() if r.headers.get("content-type", "").startswith("application/json") \
                        else {"text": r.text[:200]}
                except httpx.HTTPError as err:
                    sent.error = type(err).__name__
                sent.seconds = time.perf_counter() - began
                with lock:
                    result.sent.append(sent)
                if sent.error:
                    return  # server gone: this client stops (its request is retried after the restart)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n, d, k), daemon=True) for n, (d, k) in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    assert not any(t.is_alive() for t in threads), "a load client hung"
    result.seconds = time.monotonic() - started
    return result


def retry_failed(url: str, result: LoadResult) -> int:
    """Resend every request that got a transport error, with the same Idempotency-Key and body; returns how many
    of them had been committed before the failure (the server replays the stored reply)."""
    replayed = 0
    with httpx.Client(base_url=url, timeout=60) as c:
        for sent in result.sent:
            if sent.status is not None:
                continue
            r = c.post(ROUTES[sent.domain], json=sent.body, headers={
                "Authorization": f"Bearer {sent.key}", "Idempotency-Key": sent.idempotency_key})
            sent.status, sent.response, sent.retried = r.status_code, r.json(), True
            replayed += r.headers.get("idempotent-replayed") == "true"
    return replayed


def audit_check(db_path: Path, tag: str) -> dict:
    """Consistency of the audit rows of events tagged ``tag``: integrity, torn requests, duplicate ids."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        integrity = db.execute("pragma integrity_check").fetchone()[0]
        rows = db.execute("select score_id, request_id from scores where event_id like ?", (f"{tag}-%",)).fetchall()
        dupes = db.execute("select count(*) from (select score_id from scores group by score_id having count(*) > 1)"
                           ).fetchone()[0]
        torn = db.execute(
            "select count(*) from requests r where r.items != (select count(*) from scores s "
            "where s.request_id = r.request_id)").fetchone()[0]
        orphans = db.execute("select count(*) from scores s where not exists (select 1 from requests r "
                             "where r.request_id = s.request_id)").fetchone()[0]
    return {"integrity": integrity, "score_ids": [r[0] for r in rows], "requests": {r[1] for r in rows},
            "duplicate_score_ids": dupes, "torn_requests": torn, "orphan_scores": orphans}


def kill_tree(proc) -> list[int]:
    """SIGKILL the server and its worker processes (by pid; workers first)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    pids = [c.pid for c in children] + [proc.pid]
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs([c for c in children if c.is_running()], timeout=30)
    return pids


def _pools(server: Server, n: int = 40) -> dict[str, list[dict]]:
    return {d: _events(server, d, n, start=100) for d in ("customs", "finance")}


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---------------------------------------------------------------------------------------------- drift


def test_drift_report_flags_shift_and_not_noise():
    from training.drift import drift_report, drift_summary, reference_profile

    rng = np.random.default_rng(0)
    train = pd.DataFrame({"amount": rng.lognormal(5, 1, 5000), "channel": rng.choice(["a", "b", "c"], 5000)})
    ref = reference_profile(train, rng.beta(1, 20, 5000), ["channel"], window="train")
    same = pd.DataFrame({"amount": rng.lognormal(5, 1, 2000), "channel": rng.choice(["a", "b", "c"], 2000)})
    ok = drift_summary(drift_report(ref, same, rng.beta(1, 20, 2000)))
    assert ok["status"] == "ok" and not ok["retrain_due"]
    shifted = pd.DataFrame({"amount": rng.lognormal(7, 1, 2000), "channel": rng.choice(["c", "d"], 2000)})
    bad = drift_summary(drift_report(ref, shifted, rng.beta(5, 5, 2000)))
    assert bad["retrain_due"] and {w["name"] for w in bad["worst"][:3]} == {"amount", "channel", "score"}
    # a few dozen items of the reference population itself leave bins empty and read as drifted: no verdict
    few = train.iloc[:12]
    noisy = drift_report(ref, few, rng.beta(1, 20, 12))
    assert noisy["psi"].max() >= 0.25  # what a verdict on 12 rows would have called "retrain"
    summary = drift_summary(noisy, items=12)
    assert summary["status"] == "insufficient" and not summary["retrain_due"]
    assert drift_summary(drift_report(ref, shifted, rng.beta(5, 5, 2000)), items=2000)["retrain_due"]


def test_drift_sees_features_that_sit_mostly_on_one_value_move():
    """A flag, a count that is mostly 0 and a constant: each heavy value has its own bin, so a move of its mass
    is seen in either direction (quantile edges alone put it in one bin with everything above it: PSI 0)."""
    from training.drift import drift_report, reference_profile

    rng = np.random.default_rng(2)
    n = 5000
    train = pd.DataFrame({
        "flag": (rng.random(n) < 0.05).astype(float),
        "count": np.where(rng.random(n) < 0.92, 0, rng.poisson(3, n) + 1).astype(float),
        "constant": np.zeros(n),
    })
    ref = reference_profile(train, rng.beta(1, 20, n), [], window="calibration")
    same = pd.DataFrame({"flag": (rng.random(2000) < 0.05).astype(float),
                         "count": np.where(rng.random(2000) < 0.92, 0, rng.poisson(3, 2000) + 1).astype(float),
                         "constant": np.zeros(2000)})
    assert (drift_report(ref, same, rng.beta(1, 20, 2000))["status"] == "ok").all()
    assert "score" not in set(drift_report(ref, same, None)["name"])  # another model's scores: features only
    moved = pd.DataFrame({"flag": (rng.random(2000) < 0.5).astype(float),
                          "count": np.where(rng.random(2000) < 0.4, 0, rng.poisson(3, 2000) + 1).astype(float),
                          "constant": np.ones(2000)})
    report = drift_report(ref, moved, rng.beta(1, 20, 2000)).set_index("name")
    assert (report.loc[["flag", "count", "constant"], "status"] == "retrain").all()
    below = drift_report(ref, same.assign(constant=-1.0), rng.beta(1, 20, 2000)).set_index("name")
    assert below.loc["constant", "psi"] == pytest.approx(report.loc["constant", "psi"])
    old = {"features": {"x": {"kind": "numeric", "edges": [1.0], "shares": [0.5, 0.5, 0.0]}},
           "score": {"kind": "numeric", "edges": [0.5], "shares": [0.5, 0.5]}}  # a bundle from before
    assert drift_report(old, pd.DataFrame({"x": [0.0, 2.0] * 50}), np.r_[[0.1] * 50, [0.9] * 50])["psi"].max() < 0.01


def test_a_float32_reference_matches_the_services_float64_values():
    """feature_dtype = "float32" builds the reference from float32 features; the service computes float64. A mass
    point (a new entity's prior rate, 0.2) held as 0.20000000298 matched none of the service's 0.2 values, which
    all fell into another bin: PSI far above retrain on an unchanged feature."""
    from training.drift import drift_report, reference_profile

    rng = np.random.default_rng(4)
    values = np.where(rng.random(5000) < 0.6, 0.2, rng.random(5000))
    ref = reference_profile(pd.DataFrame({"rate": values.astype(np.float32)}), rng.beta(1, 20, 5000), [],
                            window="calibration")
    same = np.where(rng.random(2000) < 0.6, 0.2, rng.random(2000))
    report = drift_report(ref, pd.DataFrame({"rate": same}), None).set_index("name")
    assert report.loc["rate", "psi"] < 0.02 and report.loc["rate", "status"] == "ok"


def test_learned_rates_drift_up_to_watch_only():
    """A learned outcome rate (its values move as outcomes accrue) is reported, but never calls for retraining."""
    from training.drift import drift_report, drift_summary, reference_profile

    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"amount": rng.lognormal(5, 1, 3000), "risk_origin": 0.223 + rng.normal(0, 1e-4, 3000)})
    ref = reference_profile(frame, rng.beta(1, 20, 3000), [], window="calibration", learned_rates=["risk_origin"])
    moved = frame.assign(risk_origin=frame["risk_origin"] - 0.0013)  # one country's rate, a little lower
    report = drift_report(ref, moved, rng.beta(1, 20, 3000)).set_index("name")
    assert report.loc["risk_origin", "psi"] > 1.0 and report.loc["risk_origin", "status"] == "watch"
    assert not drift_summary(report.reset_index())["retrain_due"]
    unmarked = reference_profile(frame, rng.beta(1, 20, 3000), [], window="calibration")
    assert drift_summary(drift_report(unmarked, moved, rng.beta(1, 20, 3000)))["retrain_due"]


def test_drift_gauges_of_a_new_champion_start_empty_not_with_the_old_ones():
    """After a reload the gauges describe the new champion: until it has enough items, its PSI gauges are NaN
    and retraining is not due (they kept the previous model's values, so a retrain alert outlived the retrain),
    and features the new model lacks are NaN."""
    from types import SimpleNamespace

    import prometheus_client as prom

    from serving.service import RiskScore
    from training.drift import reference_profile

    rng = np.random.default_rng(3)
    ref_frame = pd.DataFrame({"amount": rng.lognormal(5, 1, 3000), "old_only": rng.normal(size=3000)})
    drifted = pd.DataFrame({"amount": rng.lognormal(9, 1, 500), "old_only": rng.normal(5, 1, 500)})
    old = SimpleNamespace(model_version="1", bundle=SimpleNamespace(
        reference=reference_profile(ref_frame, rng.beta(1, 20, 3000), [], window="calibration")))
    new = SimpleNamespace(model_version="2", bundle=SimpleNamespace(
        reference=reference_profile(ref_frame[["amount"]], rng.beta(1, 20, 3000), [], window="calibration")))
    audited = {"1": (drifted, rng.beta(5, 5, 500)), "2": (pd.DataFrame(), np.array([]))}
    live = {"customs": old}
    service = SimpleNamespace(
        _drift_at=0.0, _drift_features={},
        registry=SimpleNamespace(domains=["customs"], get=lambda d: live[d]),
        audit=SimpleNamespace(recent_features=lambda d, n, model_version: audited[model_version]))
    service._set_drift_gauges = lambda *a: RiskScore.inner._set_drift_gauges(service, *a)

    def gauge(name: str, **labels) -> float:
        return prom.REGISTRY.get_sample_value(name, {"domain": "customs", **labels})

    assert RiskScore.inner.refresh_drift(service, force=True)["customs"]["retrain_due"]
    assert gauge("riskscore_drift_retrain_due") == 1.0 and gauge("riskscore_score_psi") > 0.25
    assert gauge("riskscore_feature_psi", feature="old_only") > 0.25
    live["customs"] = new  # promoted and reloaded: no items of v2 yet
    assert RiskScore.inner.refresh_drift(service, force=True) == {}
    assert gauge("riskscore_drift_retrain_due") == 0.0 and gauge("riskscore_drift_window_items") == 0
    assert np.isnan(gauge("riskscore_score_psi")) and np.isnan(gauge("riskscore_feature_psi", feature="amount"))
    assert np.isnan(gauge("riskscore_feature_psi", feature="old_only"))


@server_test
def test_drift_reference_gauges_and_cli(server: Server):
    """The champion carries its drift reference; /metrics shows PSI gauges from the audited scores; the CLI
    reads the same audit rows and says whether retraining is due."""
    from click.testing import CliRunner

    from riskscore.commands import drift_cmd
    from serving.audit import AuditStore
    from training.drift import drift_report
    from training.registry import load_champion

    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/score_shipments", json={"items": _events(server, "customs", 40, start=200)},
                   headers=server.headers("customs"))
        assert r.status_code == 200, r.text
        text = c.get("/metrics").text
    with pytest.MonkeyPatch.context() as mp:
        _env(server, mp)
        bundle, info = load_champion("customs")
        assert set(bundle.reference["features"]) == set(bundle.feature_names) and bundle.reference["rows"] > 0
        store = AuditStore(f"sqlite:///{server.home / 'audit.db'}")
        feats, scores = store.recent_features("customs", 5000, model_version=str(info.version))
        store.close()
        report = drift_report(bundle.reference, feats, scores)
        cli = CliRunner().invoke(drift_cmd, ["--domain", "customs", "--json"])
        exit_on_retrain = CliRunner().invoke(drift_cmd, ["--domain", "customs", "--fail-on-retrain"])
    assert _metric(text, "riskscore_drift_window_items", domain="customs") == len(scores) >= 40
    gauge = _metric(text, "riskscore_score_psi", domain="customs")
    assert gauge == pytest.approx(float(report.loc[report["name"] == "score", "psi"].iloc[0]), abs=1e-9)
    feature = report["name"][report["name"] != "score"].iloc[0]
    assert _metric(text, "riskscore_feature_psi", domain="customs", feature=feature) == pytest.approx(
        float(report.loc[report["name"] == feature, "psi"].iloc[0]), abs=1e-9)
    assert _metric(text, "riskscore_drift_retrain_due", domain="customs") in (0.0, 1.0)
    assert cli.exit_code == 0, cli.output
    out = json.loads(cli.output)
    assert out["items"] == len(scores) and out["status"] in ("ok", "watch", "retrain", "insufficient")
    assert out["status"] == "insufficient" and not out["retrain_due"]  # 40 items < --min-items 200
    assert out["retrain_due"] == (_metric(text, "riskscore_drift_retrain_due", domain="customs") == 1.0)
    assert exit_on_retrain.exit_code == (3 if out["retrain_due"] else 0)
    assert ("retraining is due" in exit_on_retrain.output) == out["retrain_due"]


# ---------------------------------------------------------------------------------------------- no lost scores


@server_test
def test_concurrent_load_loses_no_score(server: Server):
    """8 clients x 5 s: every 2xx item has exactly one audit row and every audit row was returned to a client."""
    keys = _add_keys(server, [("customs", "L"), ("financial", "L")] * 4, rate=0)
    clients = [("customs" if i % 2 == 0 else "finance", k) for i, k in enumerate(keys)]
    tag = f"load{time.time_ns()}"
    result = run_load(server.url, clients, _pools(server), seconds=5, tag=tag)
    counts = result.statuses()
    assert counts["5xx"] == 0 and counts["error"] == 0, counts
    assert all(s.status == (200 if s.valid else 422) for s in result.sent)
    returned = result.score_ids()
    audit = audit_check(server.home / "audit.db", tag)
    assert audit["integrity"] == "ok" and audit["torn_requests"] == 0 and audit["duplicate_score_ids"] == 0
    assert len(returned) == len(set(returned)) == len(audit["score_ids"]) and set(returned) == set(audit["score_ids"])
    assert len(result.sent) >= 8


@server_test
def test_idempotent_retries_race_to_one_audit_row(server: Server):
    """The same Idempotency-Key sent by 6 threads at once: one scoring, six identical replies."""
    items = _events(server, "finance", 2, start=300)
    headers = {**server.headers("financial"), "Idempotency-Key": f"race-{time.time_ns()}"}
    replies: list[httpx.Response] = []
    barrier = threading.Barrier(6)

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait(timeout=30)
            replies.append(c.post("/score_transactions", json={"items": items}, headers=headers))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.status_code for r in replies] == [200] * 6
    assert len({json.dumps(r.json(), sort_keys=True) for r in replies}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in replies) == 5
    with sqlite3.connect(f"file:{server.home / 'audit.db'}?mode=ro", uri=True) as db:
        ids = [i["transaction_id"] for i in items]
        assert db.execute(f"select count(*) from scores where event_id in ({','.join('?' * len(ids))})",
                          ids).fetchone()[0] == 2


# ---------------------------------------------------------------------------------------------- security


@server_test
def test_role_agency_matrix(server: Server):
    """Every (role, agency) key against every endpoint, on a score of agency A: exact expected statuses."""
    a_score = _events(server, "customs", 1, start=400)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        score_a = c.post("/score_shipments", json={"items": a_score}, headers=server.headers("customs", "A"))
        score_id = score_a.json()["items"][0]["score_id"]
        fresh = itertools.count()

        def call(name: str, headers: dict) -> int:
            if name == "score_shipments":
                items = [dict(a_score[0], declaration_id=f"M{time.time_ns()}-{next(fresh)}")]
                return c.post("/score_shipments", json={"items": items}, headers=headers).status_code
            if name == "score_transactions":
                items = [dict(_events(server, "finance", 1, start=400)[0], transaction_id=f"M{time.time_ns()}")]
                return c.post("/score_transactions", json={"items": items}, headers=headers).status_code
            if name == "get_score":
                return c.get(f"/scores/{score_id}", headers=headers).status_code
            if name == "outcomes":
                return c.post("/outcomes", json={"score_id": score_id, "outcome": "cleared"},
                              headers=headers).status_code
            return c.post("/admin/reload", json={"domains": ["finance"]}, headers=headers).status_code

        callers = [(r, "A") for r in ("customs", "financial", "reviewer", "admin")] + [("customs", "B"),
                                                                                      ("reviewer", "B")]
        names = ("score_shipments", "score_transactions", "get_score", "outcomes", "reload")
        seen = {}
        for name in names:  # reviewer B before reviewer A on outcomes: A's decision is final (201 once)
            for role, agency in sorted(callers, key=lambda x: x[1] != "B"):
                seen[(name, role, agency)] = call(name, server.headers(role, agency))
            seen[(name, "none", "-")] = call(name, {})
    expected = {
        "score_shipments": {("customs", "A"): 200, ("customs", "B"): 200},
        "score_transactions": {("financial", "A"): 200},
        "get_score": {("reviewer", "A"): 200, ("admin", "A"): 200, ("reviewer", "B"): 404},
        "outcomes": {("reviewer", "A"): 201, ("reviewer", "B"): 404},
        "reload": {("admin", "A"): 200},
    }
    want = {(n, r, a): expected[n].get((r, a), 403) for n in names for r, a in callers}
    want.update({(n, "none", "-"): 401 for n in names})
    assert seen == want


@server_test
def test_rate_limit_answers_429_with_retry_after(server: Server):
    slow, other = _add_keys(server, [("reviewer", "A"), ("reviewer", "A")], rate=0.5, burst=2)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        path = "/scores/00000000-0000-0000-0000-000000000000"
        got = [c.get(path, headers={"Authorization": f"Bearer {slow}"}) for _ in range(3)]
        assert [r.status_code for r in got] == [404, 404, 429]
        assert got[2].headers["retry-after"] == "2" and "rate limit" in got[2].json()["error"]
        assert c.get(path, headers={"Authorization": f"Bearer {other}"}).status_code == 404  # per key
        assert c.get(path, headers={"Authorization": "Bearer rsk_unknown"}).status_code == 401


PATTERNS = {"hs6": r"^[0-9]{6}$", "country_departure": r"^[A-Z]{2}$", "country_origin": r"^[A-Z]{2}$",
            "source_country": r"^[A-Z]{2}$", "target_country": r"^[A-Z]{2}$", "currency": r"^[A-Z]{3}$",
            "date": r"^20[0-9]{2}-0[1-9]-[0-2][1-9]$", "timestamp": r"^20[0-9]{2}-0[1-9]-[0-2][1-9]T[01][0-9]:00:00Z$"}


def _openapi(server: Server) -> dict:
    """OpenAPI 3 document of the custom routes (the FastAPI app declares raw ``Request`` bodies, so the
    request bodies come from the pydantic models)."""
    from serving.models import OutcomeIn, ShipmentBatch, TransferBatch

    components: dict = {}

    def body(model) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        return {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}

    answers = {str(s): {"description": "reply"} for s in (200, 201, 400, 401, 403, 404, 409, 413, 415, 422, 429)}
    paths = {
        "/score_shipments": {"post": {"operationId": "score_shipments", "requestBody": body(ShipmentBatch),
                                      "responses": answers}},
        "/score_transactions": {"post": {"operationId": "score_transactions", "requestBody": body(TransferBatch),
                                         "responses": answers}},
        "/scores/{score_id}": {"get": {"operationId": "get_score", "responses": answers, "parameters": [
            {"name": "score_id", "in": "path", "required": True, "schema": {"type": "string"}}]}},
        "/outcomes": {"post": {"operationId": "outcomes", "requestBody": body(OutcomeIn), "responses": answers}},
    }
    for name in ("Declaration", "Transfer"):  # the custom validators' formats, so that valid batches come up too
        for prop_name, prop in components[name]["properties"].items():
            if prop.get("type") == "string":
                prop["pattern"] = PATTERNS.get(prop_name, r"^[A-Za-z0-9_-]{1,20}$")
                prop.pop("format", None)
    return {"openapi": "3.1.0", "info": {"title": "riskscore", "version": "1"}, "paths": paths,
            "components": {"schemas": components}}


@server_test
def test_schemathesis_finds_no_server_error(server: Server):
    """Schema-driven fuzzing (schemathesis, positive and negative cases, 25 per route) of every custom route
    with a key of the right role: zero 5xx, some valid batches scored, and the server stays ready."""
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_dict(_openapi(server))
    role = {"score_shipments": "customs", "score_transactions": "financial", "get_score": "reviewer",
            "outcomes": "reviewer"}
    failures, calls = [], Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        headers = server.headers(role[operation.definition.raw["operationId"]], "A")

        def make(operation=operation, headers=headers):
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE))
            def fuzz(case):
                response = case.call(base_url=server.url, headers=headers, timeout=60)
                calls[(operation.path, response.status_code)] += 1
                if response.status_code >= 500:
                    failures.append((operation.path, response.status_code, response.text[:300]))

            return fuzz

        make()()
    assert not failures, failures[:3]
    assert sum(calls.values()) >= 4 * 10, calls
    assert calls[("/score_shipments", 200)] and calls[("/score_transactions", 200)], calls
    print("\nschemathesis calls by (route, status):", dict(sorted(calls.items())))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/readyz").json()["status"] in ("ready", "degraded")


def header_value(size: int):  # any byte value HTTP/1.1 can carry (visible ASCII, obs-text, spaces)
    alphabet = st.sampled_from([" ", *(chr(c) for c in range(33, 256) if c != 127)])
    return st.text(alphabet, max_size=size).map(lambda v: v.strip().encode("latin-1"))


HEADERS = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "application/problem+json", "", "application/json; charset=latin-1"]),
    "Idempotency-Key": header_value(200),
    "X-Request-ID": header_value(300),
})


@server_test
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["/score_shipments", "/score_transactions", "/outcomes", "/admin/reload"]),
       body=st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200),
                      st.just(b"[" * 5_000), st.just(b'{"items": [' + b'{"a": 1},' * 1_500 + b"{}]}"),
                      st.just(b'{"items": [1e999]}'), st.just(b'{"items": [NaN]}')),
       headers=HEADERS)
def test_hostile_http_requests_are_4xx(server: Server, route: str, body: bytes, headers: dict):
    role = {"/score_shipments": "customs", "/score_transactions": "financial", "/outcomes": "reviewer",
            "/admin/reload": "admin"}[route]
    if route == "/admin/reload" and b"force" in body:
        return  # a forced rebuild is legitimate (and slow), not hostile
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post(route, content=body, headers={**server.headers(role), **headers})
        assert r.status_code < 500, (route, body[:200], headers, r.text[:300])
        if r.status_code >= 400:
            assert r.json()["error"]


@server_test
def test_server_healthy_after_hostile_input(server: Server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/readyz").status_code == 200
        r = c.post("/score_transactions", json={"items": _events(server, "finance", 1, start=500)},
                   headers=server.headers("financial"))
        assert r.status_code == 200, r.text
        huge = {"items": [_events(server, "finance", 1, start=500)[0]] * 50_000}
        assert c.post("/score_transactions", json=huge, headers=server.headers("financial")).status_code == 413


# ---------------------------------------------------------------------------------------------- model faults


def _bundle_dir(server: Server, domain: str) -> Path:
    root = Path(server.env["RISKSCORE_ARTIFACT_ROOT"].removeprefix("file://"))
    found = sorted(root.glob(f"riskscore-{domain}/**/bundle/booster.txt"))
    assert len(found) == 1, found
    return found[0].parent


@server_test
def test_broken_champion_keeps_previous_serving(server: Server):
    """Corrupt and then missing champion artifacts: forced reload answers 409, logs why, /readyz says degraded,
    the loaded champion keeps scoring; once repaired, a reload clears the error."""
    bundle = _bundle_dir(server, "finance")
    booster = bundle / "booster.txt"
    saved = booster.read_bytes()
    items = _events(server, "finance", 1, start=600)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for hostile in ({"domains": ["finance"], "model_uri": "file:///tmp/evil"}, {"path": "/tmp/evil.pkl"},
                        {"domains": ["../finance"]}, {"domains": ["finance"], "force": "yes"},
                        {"domains": [["finance"]]}, {"domains": [{}]}, {"domains": []}):
            r = c.post("/admin/reload", json=hostile, headers=server.headers("admin"))
            assert r.status_code == 422, (hostile, r.text)  # no request field can name a model or a path
        try:
            for fault in ("corrupt", "missing"):
                if fault == "corrupt":
                    booster.write_bytes(b"tree\nnot a lightgbm model\n")
                else:
                    booster.write_bytes(saved)
                    bundle.rename(bundle.with_name("bundle.moved"))
                r = c.post("/admin/reload", json={"domains": ["finance"], "force": True},
                           headers=server.headers("admin"))
                assert r.status_code == 409, r.text
                assert "keep serving" in r.json()["error"] and r.json()["detail"][0]["loc"] == "domains.finance"
                ready = c.get("/readyz")
                assert ready.status_code == 200 and ready.json()["status"] == "degraded"
                finance = ready.json()["domains"]["finance"]
                assert finance["model"]["version"] == "1" and "no usable champion" in finance["reload_error"]["error"]
                scored = c.post("/score_transactions", json={"items": [dict(items[0], transaction_id=f"F{fault}")]},
                                headers=server.headers("financial"))
                assert scored.status_code == 200 and scored.json()["items"][0]["model"]["version"] == "1"
        finally:
            if not bundle.exists():
                bundle.with_name("bundle.moved").rename(bundle)
            booster.write_bytes(saved)
        r = c.post("/admin/reload", json={"domains": ["finance"], "force": True}, headers=server.headers("admin"))
        assert r.status_code == 200, r.text
        assert c.get("/readyz").json()["status"] == "ready"
    log = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    assert any("reload failed; the previous champion keeps serving" in x["msg"] for x in log)


def test_service_never_unpickles_or_loads_models_from_request_data():
    """Static guard: the serving code has no pickle/joblib/cloudpickle and no MLflow model loading of its own
    (champions come only from ``training.registry.load_champion``, which reads plain bundle files)."""
    root = Path(__file__).parents[1]
    for path in [*sorted((root / "serving").rglob("*.py")), root / "training" / "bundle.py"]:
        text = path.read_text()
        for banned in ("import pickle", "cloudpickle", "joblib", "pyfunc.load_model", "mlflow.sklearn.load",
                       "torch.load", "eval(", "exec("):
            assert banned not in text, (path.relative_to(root), banned)


def test_schema_incompatible_champion_is_refused(tmp_path):
    """A champion whose feature list is not what this code computes is refused before it can serve."""
    from features.domains import feature_set
    from serving.audit import AuditStore
    from serving.scorer import DomainScorer, ServingConfigError
    from tests.test_service import tiny_bundle

    bundle = tiny_bundle("finance", [*feature_set("finance").names[:3], "feature_from_another_version"], rounds=2)
    audit = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        with pytest.raises(ServingConfigError, match="feature_from_another_version"):
            DomainScorer.build("finance", audit, (bundle, "riskscore-finance", "9"))
    finally:
        audit.close()


def test_unreachable_tracking_server_refuses_to_start(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from serving.cli import serve_cmd

    port = _free_port()
    monkeypatch.setenv("RISKSCORE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    started = time.monotonic()
    result = CliRunner().invoke(serve_cmd, ["--domains", "customs", "--port", str(_free_port())])
    assert result.exit_code == 1
    assert "domain 'customs' has no usable champion" in result.output and f"127.0.0.1:{port}" in result.output
    assert time.monotonic() - started < 60


def test_training_refuses_invalid_data(tmp_path, monkeypatch):
    from features.schemas import DataValidationError
    from features.synthetic import generate
    from training.pipeline import TrainConfig, train

    monkeypatch.setenv("RISKSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = generate("finance", 1000, seed=3, out_dir=tmp_path / "data", positive_rate=0.05, progress=False)
    part = sorted(Path(data).glob("transactions/*.parquet"))[0]
    frame = pd.read_parquet(part)
    frame.loc[frame.index[7], "amount"] = -5.0
    frame.to_parquet(part, index=False)
    with pytest.raises(DataValidationError, match=r"amount"):
        train("finance", data, config=TrainConfig(seed=0, quiet=True, num_threads=1))
    assert not (tmp_path / "mlflow.db").exists() or "riskscore-finance" not in (tmp_path / "mlflow.db").read_bytes(
        ).decode("latin-1")


# ---------------------------------------------------------------------------------------------- replicas


def _features(url: str, headers: dict, score_id: str) -> dict:
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.get(f"/scores/{score_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["features"]


def _status_streak(url: str, headers: dict, item: dict, want: int, streak: int = 8, tries: int = 120) -> int:
    """Post ``item`` (fresh id each time, new connection each time so requests spread over the workers) until
    ``streak`` answers in a row have status ``want``; returns the number of requests (bounded by ``tries``)."""
    run = 0
    for i in range(tries):
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/score_transactions", json={"items": [dict(item, transaction_id=f"{item['transaction_id']}"
                                                                                        f"-{i}")]}, headers=headers)
        run = run + 1 if r.status_code == want else 0
        if run == streak:
            return i + 1
        time.sleep(0.1)
    raise AssertionError(f"no {streak} answers {want} in a row after {tries} requests; last {r.status_code}")


def count_across_replicas(server: Server, route: list[str]) -> dict:
    """Score transfers of one new account pair through the servers of ``route`` in turn (one minute apart) and
    check that each counts every earlier one (``src_out_count``, ``dst_in_count``, ``pair_count`` = 0, 1, 2...),
    read back through the first server; returns the item template used."""
    template = _events(server, "finance", 1, start=5)[0]
    t0 = pd.Timestamp(template["timestamp"])
    tag = time.time_ns()
    seen = []
    for i, url in enumerate(route):
        item = dict(template, transaction_id=f"R{tag}-{i}", source_account=f"SRC{tag}", target_account=f"DST{tag}",
                    timestamp=(t0 + pd.Timedelta(minutes=i)).isoformat())
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/score_transactions", json={"items": [item]}, headers=server.headers("financial"))
        assert r.status_code == 200, r.text
        feats = _features(route[0], server.headers("reviewer"), r.json()["items"][0]["score_id"])
        seen.append((feats["src_out_count"], feats["dst_in_count"], feats["pair_count"]))
    assert seen == [(float(i), float(i), float(i)) for i in range(len(route))], seen
    return template


def accepted_across_replicas(urls: list[str], key: str, template: dict, requests: int,
                             read: str | None = None) -> int:
    """Send ``requests`` requests with ``key`` through the servers of ``urls`` in turn (a new connection each, so
    a replica's workers share them): single transfers to score, or reads of the score ``read``; how many were
    accepted. The others must be 429 with Retry-After."""
    accepted = 0
    for i in range(requests):
        headers = {"Authorization": f"Bearer {key}"}
        if read is None:
            item = dict(template, transaction_id=f"L{time.time_ns()}-{i}")
            r = httpx.post(f"{urls[i % len(urls)]}/score_transactions", json={"items": [item]}, headers=headers,
                           timeout=60)
        else:
            r = httpx.get(f"{urls[i % len(urls)]}/scores/{read}", headers=headers, timeout=60)
        if r.status_code == 200:
            accepted += 1
        else:
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, (r.status_code, r.text)
    return accepted


def scored_once(url: str, server: Server, template: dict) -> str:
    """Score one transfer of ``template`` (agency A) through ``url``; its score id."""
    item = dict(template, transaction_id=f"R{time.time_ns()}")
    r = httpx.post(f"{url}/score_transactions", json={"items": [item]}, headers=server.headers("financial"),
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["items"][0]["score_id"]


@server_test
def test_replicas_on_one_audit_store_see_each_others_events_and_reloads(server: Server, tmp_path):
    """A second replica (2 workers) on the same audit store: transfers of one new account scored alternately
    through both count every earlier one, whichever process scored it (catch-up before each request); a key's
    rate limit holds across all three workers, for scoring and for reads; and a key revoked and reloaded through
    the first replica is refused by every worker of the second. A review page session opened on one replica is
    known to every worker of both (sessions live in the audit store), and ends everywhere at logout or revocation."""
    from tests.test_review_page import _csrf, _login

    path = Path(server.env["RISKSCORE_KEYS_FILE"])
    temp_key, entry, _ = auth.add_key("financial", "A", path)
    review_key, review_entry, _ = auth.add_key("reviewer", "A", path)
    limited, reader = _add_keys(server, [("financial", "L"), ("reviewer", "A")], rate=0.01, burst=4)
    port = _free_port()
    log = tmp_path / "replica.log"
    proc = launch({**server.env, "RISKSCORE_DOMAINS": "finance", "RISKSCORE_WORKERS": "2"}, log, port)
    other = f"http://127.0.0.1:{port}"
    try:
        wait_ready(other, proc, log)
        template = count_across_replicas(server, [server.url, other, server.url, other, other, server.url])
        # one bucket for the deployment: each worker charges what the others recorded (per worker it would be 12)
        assert accepted_across_replicas([server.url, other], limited, template, 10) == 4
        # reads too (recorded in key_requests): per worker a reviewer would get 12 of them
        score_id = scored_once(other, server, template)
        assert accepted_across_replicas([server.url, other], reader, template, 10, read=score_id) == 4
        # an idle replica catches up in the background: the first server, given no request, ingests what the
        # second scored within about a second ($RISKSCORE_IDLE_SYNC_S)
        def history_events() -> int:
            return httpx.get(f"{server.url}/readyz", timeout=30).json()["domains"]["finance"]["history_events"]

        before, batch = history_events(), [dict(template, transaction_id=f"I{time.time_ns()}-{i}") for i in range(20)]
        with httpx.Client(base_url=other, timeout=60) as c:
            r = c.post("/score_transactions", json={"items": batch}, headers=server.headers("financial"))
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20
        while history_events() < before + len(batch):
            assert time.monotonic() < deadline, "the idle replica did not catch up in the background"
            time.sleep(0.2)
        # review sessions: opened on the first replica, used on fresh connections to both (any worker)
        def review_statuses(cookies: httpx.Cookies, n: int = 8) -> set[int]:
            statuses = set()
            for i in range(n):
                with httpx.Client(base_url=[server.url, other][i % 2], cookies=cookies, timeout=60) as c:
                    statuses.add(c.get("/review/queue").status_code)
            return statuses

        sessions = []
        for key in (server.keys[("reviewer", "A")], review_key):
            with httpx.Client(base_url=server.url, timeout=60) as c:
                assert _login(c, key).status_code == 303
                sessions.append(httpx.Cookies({"riskscore_review": c.cookies["riskscore_review"]}))
        assert review_statuses(sessions[0]) == review_statuses(sessions[1]) == {200}
        with httpx.Client(base_url=other, cookies=sessions[0], timeout=60) as c:
            assert c.post("/review/logout", data={"csrf": _csrf(c.get("/review/queue").text)}).status_code == 303
        assert review_statuses(sessions[0]) == {303}  # logged out on the second replica: gone everywhere
        # a key revoked and reloaded through the first replica: the second follows
        auth.revoke_key(review_entry.id, path)
        temp = {"Authorization": f"Bearer {temp_key}"}
        item = dict(template, transaction_id=f"K{time.time_ns()}")
        _status_streak(other, temp, item, 200)
        auth.revoke_key(entry.id, path)
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.post("/admin/reload", json={"domains": ["finance"]},
                          headers=server.headers("admin")).status_code == 200
        _status_streak(other, temp, item, 401)
        assert review_statuses(sessions[1]) == {303}  # the revoked reviewer's session ended on every worker
    finally:
        local_server.stop(proc)


# ---------------------------------------------------------------------------------------------- SIGKILL (last)


@server_test
def test_a_read_waiting_for_the_audit_write_lock_does_not_stall_the_worker(server: Server):
    """A reviewer's read records its request in the audit store; while the write lock is held elsewhere that read
    waits in the thread pool, and the worker answers other requests meanwhile (it used to wait on the event
    loop, stalling every request of the worker)."""
    score_id = None
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/score_shipments", json={"items": _events(server, "customs", 1, start=700)},
                   headers=server.headers("customs"))
        assert r.status_code == 200, r.text
        score_id = r.json()["items"][0]["score_id"]
    holder = os.open(str(server.home / "audit.db.lock"), os.O_RDWR | os.O_CREAT)
    result: dict = {}

    def read() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            result["read"] = c.get(f"/scores/{score_id}", headers=server.headers("reviewer"))

    reader = threading.Thread(target=read)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        reader.start()
        time.sleep(0.5)
        assert "read" not in result  # waiting for the lock
        with httpx.Client(base_url=server.url, timeout=5) as c:
            assert c.get("/readyz").status_code == 200
            assert c.get("/healthz").status_code == 200
        assert "read" not in result
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
        reader.join(timeout=60)
    assert result["read"].status_code == 200 and result["read"].json()["score_id"] == score_id


@server_test
def test_sigkill_mid_load_then_restart_keeps_audit_consistent(server: Server):
    """Kill -9 the server (arbiter and worker) under load, restart it, retry the requests that got a transport
    error with their Idempotency-Key: the audit has no torn rows or duplicate ids, every committed score was
    returned exactly once, and every returned score is in the audit."""
    keys = _add_keys(server, [("customs", "K"), ("financial", "K")] * 3, rate=0)
    clients = [("customs" if i % 2 == 0 else "finance", k) for i, k in enumerate(keys)]
    stop, tag = threading.Event(), f"kill{time.time_ns()}"
    box: dict = {}
    loader = threading.Thread(target=lambda: box.setdefault("result", run_load(
        server.url, clients, _pools(server), seconds=60, tag=tag, stop=stop)))
    loader.start()
    time.sleep(2.5)
    killed = kill_tree(server.proc)
    time.sleep(0.5)
    stop.set()
    loader.join(timeout=180)
    result: LoadResult = box["result"]
    before = result.statuses()
    assert before["5xx"] == 0 and before["2xx"] > 0 and before["error"] > 0, before
    port = _free_port()
    proc = launch(server.env, server.log, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, server.log)
        audit = audit_check(server.home / "audit.db", tag)
        assert audit["integrity"] == "ok", audit["integrity"]
        assert audit["torn_requests"] == 0 and audit["duplicate_score_ids"] == 0 and audit["orphan_scores"] == 0
        returned_before = set(result.score_ids())
        assert returned_before <= set(audit["score_ids"])  # every score a client got is in the audit
        replayed = retry_failed(url, result)
        after = result.statuses()
        assert after["error"] == 0 and after["5xx"] == 0, after
        assert all(s.status == (200 if s.valid else 422) for s in result.sent)
        final = audit_check(server.home / "audit.db", tag)
        returned = result.score_ids()
        assert len(returned) == len(set(returned)) == len(final["score_ids"]) and set(returned) == set(
            final["score_ids"])
        assert final["torn_requests"] == 0 and final["duplicate_score_ids"] == 0
        assert replayed <= len(clients)  # at most the requests in flight at the kill were committed unseen
        print(f"\nkill test: pids {killed}, sent {len(result.sent)}, before kill {dict(before)}, "
              f"retried {sum(s.retried for s in result.sent)} (replayed {replayed}), audit rows {len(returned)}")
    finally:
        local_server.stop(proc)



def test_pip_audit_policy_fails_only_on_fixable_advisories(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pip_audit_policy", Path(__file__).parents[1] / "scripts" /
                                                  "pip_audit.py")
    policy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(policy)
    unfixable = {"name": "bar", "version": "2.0", "vulns": [{"id": "GHSA-x", "fix_versions": [], "aliases": []}]}
    fixable = {"name": "foo", "version": "1.0", "vulns": [{"id": "PYSEC-1", "fix_versions": ["1.1"],
                                                           "aliases": ["CVE-1"]}]}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"dependencies": [unfixable, {"name": "riskscore", "skip_reason": "editable"}]}))
    assert policy.main(["--report", str(report)]) == 0
    assert "warning (no fix yet): bar 2.0: GHSA-x" in capsys.readouterr().out
    report.write_text(json.dumps({"dependencies": [unfixable, fixable]}))
    assert policy.main(["--report", str(report)]) == 1
    assert "FAIL (fix available): foo 1.0: PYSEC-1 (CVE-1): fixed in 1.1" in capsys.readouterr().out
    assert policy.classify({"dependencies": [fixable]}, {"CVE-1"})[2][0]["id"] == "PYSEC-1"  # ignored by alias
    report.write_text(json.dumps({"dependencies": [{"name": "x", "skip_reason": "not found on PyPI"}]}))
    assert policy.main(["--report", str(report)]) == 0  # nothing audited: a warning, not a failure
    assert "none of the 1 packages could be audited; the first reason: not found on PyPI" in capsys.readouterr().err


def _audit_rows(request_id: str) -> tuple[dict, list[dict]]:
    from serving.audit import utcnow

    request = {"request_id": request_id, "created_at": utcnow(), "domain": "finance", "caller_key_id": "k1",
               "agency": "FIU", "idempotency_key": None, "body_sha256": "0" * 64, "items": 1}
    row = {"score_id": f"s-{request_id}", "request_id": request_id, "item_index": 0, "created_at": utcnow(),
           "domain": "finance", "event_id": f"e-{request_id}", "caller_key_id": "k1", "agency": "FIU",
           "model_name": "m", "model_version": "1", "input_json": {"amount": 1.0}, "features_json": {"f": float("nan")},
           "score": 0.5, "band": "medium", "flagged": False, "threshold": 0.7,
           "explanation_json": {"base_value": 0.1, "raw_margin": 0.2, "reasons": [], "contributions": {"f": 0.1}}}
    return request, [row]


def test_seq_cursor_rereads_holes_until_they_commit_or_expire():
    from serving.audit import GAP_WAIT_S, SeqCursor

    now = [0.0]
    cursor = SeqCursor(clock=lambda: now[0])
    cursor.mark([2, 1, 5])
    assert cursor.top == 5 and set(cursor.gaps) == {3, 4}
    import sqlalchemy as sa

    where = [str(c.compile(compile_kwargs={"literal_binds": True})) for c in cursor.where(sa.column("seq"))]
    assert where == ["seq > 5", "seq IN (3, 4)"]
    cursor.mark([4])
    assert set(cursor.gaps) == {3}
    now[0] = GAP_WAIT_S + 1  # seq 3 never committed (a rolled-back insert): given up
    cursor.mark([])
    assert cursor.gaps == {} and [str(c) for c in cursor.where(sa.column("seq"))] == ["seq > :seq_1"]


def test_own_rows_never_make_a_reader_skip_what_others_committed_below_them():
    """A writer's own rows are applied already, but rows other processes committed below them are not read yet:
    they are read later however many there are (no window) and however long no read ran (the clock starts at the
    first read that misses them); only rows missing from every read for GAP_WAIT_S are given up."""
    import sqlalchemy as sa

    from serving.audit import GAP_WAIT_S, GAP_WINDOW, SeqCursor

    def sql(cursor: SeqCursor) -> list[str]:
        return [str(c.compile(compile_kwargs={"literal_binds": True})) for c in cursor.where(sa.column("seq"))]

    now = [0.0]
    cursor = SeqCursor(clock=lambda: now[0])
    cursor.written([1, 2])  # alone: own rows just move the top, nothing to read back
    assert cursor.top == 2 and not cursor.behind(2)
    others = GAP_WINDOW + 500  # other workers committed seqs 3 .. others + 2 meanwhile
    cursor.written([others + 3])
    now[0] = 10 * GAP_WAIT_S  # a long quiet spell before the next read
    assert cursor.behind(others + 3) and sql(cursor) == [f"seq > 2 AND (seq NOT IN ({others + 3}))"]
    cursor.mark(list(range(3, others + 3)))  # the read found them all
    assert cursor.top == others + 3 and not cursor.skip and not cursor.gaps and not cursor.behind(others + 3)
    cursor.written([others + 5])  # others + 4 was never committed (a rolled-back insert)
    cursor.mark([])
    assert cursor.top == others + 3 and cursor.behind(others + 5)
    now[0] += GAP_WAIT_S + 1
    cursor.mark([])
    assert cursor.top == others + 5 and not cursor.skip and not cursor.behind(others + 5)


def test_audit_replay_reads_each_row_once_across_domains_and_late_commits(tmp_path):
    """Replays read past cursors: other domains' rows move the cursor only, rows a writer marked as its own are
    not read back, and a row committed late below the top (PostgreSQL sequence order) is still read, once."""
    from serving.audit import AuditStore, SeqCursor

    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")

    def write(request_id: str, seq: int, domain: str = "finance") -> list[int]:
        request, rows = _audit_rows(request_id)
        request["domain"] = domain
        rows[0].update(seq=seq, domain=domain, input_json={"transaction_id": request_id})
        return store.record_scores(request, rows, response={})

    try:
        scores, outcomes = SeqCursor(), SeqCursor()
        write("r1", 1)
        scores.mark(write("r3", 3))  # this reader wrote r3 itself
        write("c4", 4, "customs")
        assert store.heads() == (4, 0)
        first = store.replay("finance", scores, outcomes)
        assert [r["transaction_id"] for r in first.event_rows] == ["r1"] and first.score_seqs == [1, 4]
        scores.mark(first.score_seqs)
        assert set(scores.gaps) == {2}  # no row 2 yet: waited for
        write("r5", 5)
        write("r2", 2)  # took seq 2 before r3 but committed after it
        store.record_outcome("s-r1", "confirmed", None, "k2", "FIU")
        assert scores.behind(store.heads()[0]) and outcomes.behind(store.heads()[1])
        second = store.replay("finance", scores, outcomes)
        assert [r["transaction_id"] for r in second.event_rows] == ["r2", "r5"] and second.score_seqs == [2, 5]
        assert [r.score_id for r in second.decided] == ["s-r1"] and second.outcome_seqs == [1]
        scores.mark(second.score_seqs)
        outcomes.mark(second.outcome_seqs)
        third = store.replay("finance", scores, outcomes)
        assert third.event_rows == [] and third.decided == [] and third.score_seqs == []
    finally:
        store.close()


def test_requests_after_gives_each_request_once_with_its_key_and_time(tmp_path):
    """What the shared rate limit reads: one entry per scoring request (not per item) and per request of another
    route, its key and when it was made, in time order; rows this worker marked as its own skipped, and a row
    committed late below the top still read, once."""
    import datetime as dt

    from serving.audit import AuditStore, SeqCursor

    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")

    def write(request_id: str, seqs: list[int], key: str = "k1") -> list[int]:
        request, (row,) = _audit_rows(request_id)
        request.update(caller_key_id=key, created_at=dt.datetime(2026, 1, 1, 12, 0, len(seqs)))
        rows = [{**row, "seq": seq, "score_id": f"s-{request_id}-{i}", "item_index": i, "caller_key_id": key,
                 "created_at": request["created_at"]} for i, seq in enumerate(seqs)]
        return store.record_scores(request, rows, response={})

    try:
        scored, other = SeqCursor(start=store.heads()[0]), SeqCursor(start=store.usage_heads()[1])
        scored.mark(write("mine", [1]))
        write("batch", [3, 4, 5], key="k2")  # seq 2 taken by a transaction not committed yet
        other.mark([store.record_key_request("k3", "A", "r-mine", "GET", "/scores/s-mine-0")])
        before = time.time()
        assert store.record_key_request("k4", "A", "r-read", "GET", "/scores/s-batch-0") == 2
        made, score_seqs, other_seqs = store.requests_after(scored, other)
        noon = dt.datetime(2026, 1, 1, 12, 0, 3, tzinfo=dt.UTC).timestamp()
        assert [key for key, _ in made] == ["k2", "k4"] and made[0][1] == noon
        assert before - 1 <= made[1][1] <= time.time() + 1
        assert score_seqs == [3, 4, 5] and other_seqs == [2] and store.usage_heads() == (5, 2)
        scored.mark(score_seqs)
        other.mark(other_seqs)
        write("late", [2])
        made, score_seqs, other_seqs = store.requests_after(scored, other)
        assert [key for key, _ in made] == ["k1"] and score_seqs == [2] and other_seqs == []
        scored.mark(score_seqs)
        assert store.requests_after(scored, other) == ([], [], []) and not scored.behind(store.heads()[0])
        assert store.requests_after(scored) == ([], [], [])
    finally:
        store.close()


def test_two_workers_share_one_bucket_for_reads_as_for_scores(tmp_path):
    """Two workers' SharedUsage on one store: reads accepted by one are charged to the other's bucket (and not
    to its own twice), so a reviewer key with burst 3 gets 3 reads in all, not 3 per worker."""
    from serving.audit import AuditStore
    from serving.usage import SharedUsage

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    entry = auth.KeyEntry(sha256="0" * 64, role="reviewer", agency="A", id="r1", rate=0.001, burst=3)
    keys = auth.KeyStore([entry], "test")
    stores = [AuditStore(url), AuditStore(url)]
    workers = [(SharedUsage(store, auth.RateLimiter(), lambda: keys), store) for store in stores]
    try:
        accepted = 0
        for i in range(8):
            usage, _ = workers[i % 2]
            caller = keys.caller("r1")
            try:
                usage.take(caller)
            except auth.AuthError as err:
                assert err.status == 429
                continue
            usage.record(caller, f"req-{i}", "GET", f"/scores/s{i}")
            accepted += 1
        assert accepted == 3
        assert stores[0].usage_heads() == (0, 3)
        assert workers[0][0].follow() == 0 and workers[1][0].follow() == 0  # nothing new, own rows not re-read
    finally:
        for store in stores:
            store.close()


def test_background_wal_checkpoint_moves_commits_into_the_database_file(tmp_path, monkeypatch):
    """The service's audit store: commits only append to SQLite's log (no checkpoint stall inside a request), a
    background thread folds the log into the database file, and close() leaves an empty log."""
    import shutil

    from serving.audit import AuditStore

    monkeypatch.setenv("RISKSCORE_AUDIT_CHECKPOINT_S", "0.05")
    db = tmp_path / "audit.db"
    store = AuditStore(f"sqlite:///{db}", background_checkpoint=True)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    for i in range(5):
        store.record_scores(*_audit_rows(f"r{i}"), response={"items": []})

    def rows_in_main_file() -> int:  # a copy of the database file alone: what has been checkpointed
        copy = tmp_path / "main-only.db"
        shutil.copyfile(db, copy)
        try:
            with contextlib.closing(sqlite3.connect(copy)) as con:
                return con.execute("SELECT count(*) FROM scores").fetchone()[0]
        except sqlite3.OperationalError:  # not even the tables are checkpointed yet
            return 0

    deadline = time.monotonic() + 10
    while rows_in_main_file() < 5:
        assert time.monotonic() < deadline, "the background checkpoint never ran"
        time.sleep(0.05)
    stored = store.get_score("s-r3")
    assert stored["features_json"] == {"f": None} and stored["explanation_json"]["contributions"] == {"f": 0.1}
    store.close()
    wal = db.with_name("audit.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0


def test_freeze_heap_keeps_full_collections_off_long_lived_objects():
    """After ``freeze_heap`` every full collection freezes its survivors, so the next one does not scan them."""
    import gc

    from serving.scorer import _freeze_after_full_collection, freeze_heap

    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
        state = [[i] for i in range(20_000)]  # new long-lived objects, like keys added to the feature state
        tracked = {id(o) for o in gc.get_objects()}  # the collector's generations (not the frozen objects)
        assert all(id(x) in tracked for x in state)
        gc.collect()
        # the survivors of the full collection were frozen: no generation holds them any more (counting frozen
        # objects instead is flaky: objects frozen earlier may be freed meanwhile, e.g. by other threads)
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(x) in tracked for x in state)
    finally:
        if _freeze_after_full_collection in gc.callbacks:
            gc.callbacks.remove(_freeze_after_full_collection)
        gc.unfreeze()


def test_an_unavailable_audit_store_is_a_503_with_retry_after():
    """Disk full, a lock held too long, a dropped connection: the client learns the store is unavailable and when
    to retry, instead of a bare 500."""
    import sqlalchemy.exc as sa_exc
    from starlette.testclient import TestClient

    from serving.service import app

    @app.get("/_store_down")
    async def _store_down():
        raise sa_exc.OperationalError("INSERT INTO scores ...", {}, Exception("database or disk is full"))

    try:
        response = TestClient(app, raise_server_exceptions=False).get("/_store_down")
    finally:
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", "") != "/_store_down"]
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert "audit store is unavailable" in response.json()["error"] and response.json()["request_id"]


def test_write_lock_waits_for_its_holder_and_gives_up_on_a_hung_one(tmp_path):
    """A writer takes the SQLite write lock as soon as its holder lets go, and a holder that never does (a hung
    process) makes it give up with :class:`AuditStoreBusy` (an OperationalError: the service's 503) instead of
    waiting for ever."""
    from serving.audit import AuditStoreBusy, WriteLock

    db = str(tmp_path / "audit.db")
    holder = os.open(db + ".lock", os.O_RDWR | os.O_CREAT)
    lock = WriteLock(db, timeout=0.3)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(AuditStoreBusy, match="audit write lock"), lock:
            pass
        assert time.monotonic() - started >= 0.3
        release = threading.Timer(0.1, fcntl.flock, (holder, fcntl.LOCK_UN))
        release.start()
        with lock, pytest.raises(BlockingIOError):  # the holder let go in time: this writer holds it now
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        release.join()
        for _ in range(200):  # released on exit (and by the waiter given up on, once it got its turn)
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            time.sleep(0.01)
        else:
            pytest.fail("the write lock stayed held after its writer finished")
    finally:
        os.close(holder)
        lock.close()

"""End-to-end tests of the BentoML scoring service over HTTP (one real server for the module).

The fixture trains both domains on small synthetic data into a throw-away MLflow registry, writes a key
file (one key per role, two agencies), starts ``bentoml serve serving.service:RiskScore`` on a free
127.0.0.1 port and stops it at the end.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from serving import auth, local_server
from serving.models import ScoreResponse


def server_test(fn):
    """Marks a test that uses the real server (one xdist group: with ``--dist loadgroup`` one server in all)."""
    return pytest.mark.server(pytest.mark.slow(pytest.mark.xdist_group("riskscore-service")(fn)))


REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120.0
ROWS = {"customs": 3000, "finance": 4000}
ROLES_AGENCY_A = ("customs", "financial", "reviewer", "admin")
ROLES_AGENCY_B = ("customs", "reviewer")


# ---------------------------------------------------------------------------------------------- fixtures


def _free_port() -> int:
    return local_server.free_port()


def _train(domain: str, data_dir: Path, seed: int) -> str:
    """Train and register a model of ``domain`` with the training pipeline; returns its registry version."""
    from training.pipeline import TrainConfig, train

    result = train(domain, data_dir, config=TrainConfig(seed=seed, quiet=True, num_threads=1))
    assert result.model_version is not None
    return str(result.model_version)


def _promote(domain: str, version: str) -> None:
    from training.registry import promote

    promote(domain, version, reason="service reload test", by="tests")


class Server:
    """A running service: base URL, keys by ``(role, agency)``, environment and paths."""

    def __init__(self, url: str, keys: dict[tuple[str, str], str], env: dict[str, str], home: Path, log: Path,
                 data: dict[str, Path], proc: subprocess.Popen):
        self.url, self.keys, self.env, self.home, self.log, self.data, self.proc = url, keys, env, home, log, data, proc

    def headers(self, role: str, agency: str = "A") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[(role, agency)]}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    from features.synthetic import generate

    root = tmp_path_factory.mktemp("service")
    home = root / "home"
    env = {
        **os.environ,
        "RISKSCORE_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "RISKSCORE_ARTIFACT_ROOT": (root / "artifacts").as_uri(),
        "RISKSCORE_KEYS_FILE": str(root / "keys.json"),
        "RISKSCORE_DOMAINS": "customs,finance",
        "RISKSCORE_FAIL_FAST": "1",
        "BENTOML_HOME": str(root / "bentoml"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RISKSCORE_AUDIT_URL", None)
    data = {}
    with pytest.MonkeyPatch.context() as mp:
        for key in ("RISKSCORE_HOME", "MLFLOW_TRACKING_URI", "RISKSCORE_ARTIFACT_ROOT", "RISKSCORE_KEYS_FILE"):
            mp.setenv(key, env[key])
        for domain in ("customs", "finance"):
            data[domain] = generate(domain, ROWS[domain], seed=1, out_dir=root / "data" / domain,
                                    positive_rate=0.08, progress=False)
            _train(domain, data[domain], seed=0)
        keys = {}
        for agency, roles in (("A", ROLES_AGENCY_A), ("B", ROLES_AGENCY_B)):
            for role in roles:
                keys[(role, agency)] = auth.add_key(role, agency, root / "keys.json")[0]

    port = _free_port()
    log = root / "server.log"
    proc = launch(env, log, port)
    srv = Server(f"http://127.0.0.1:{port}", keys, env, home, log, data, proc)
    try:
        wait_ready(srv.url, proc, log)
        yield srv
    finally:
        local_server.stop(proc)


def launch(env: dict[str, str], log: Path, port: int) -> subprocess.Popen:
    """Start the service on 127.0.0.1:``port`` from the repository root, output appended to ``log``."""
    return local_server.launch(env, log, port, cwd=REPO)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll ``/readyz`` until 200; fail the test if the server exits or is not ready in time."""
    try:
        local_server.wait_ready(url, proc, log, timeout)
    except local_server.ServerStartError as err:
        pytest.fail(str(err))


@functools.cache
def _dataset(domain: str, path: Path) -> pd.DataFrame:
    from features.datasets import load_dataset
    from features.domains import events_of

    return events_of(load_dataset(domain, path))


def _events(server: Server, domain: str, n: int, start: int = 0) -> list[dict]:
    """``n`` of the latest events of the domain's synthetic data as API items (labels dropped, fresh ids)."""
    frame = _dataset(domain, server.data[domain]).iloc[-(start + n):][:n]
    id_col = "declaration_id" if domain == "customs" else "transaction_id"
    keep = [c for c in frame.columns if c not in ("fraud", "critical_fraud", "revenue", "typology", "is_laundering")]
    items = []
    for i, row in enumerate(frame[keep].to_dict("records")):
        item = {k: (None if v is pd.NA or (isinstance(v, float) and np.isnan(v)) else v) for k, v in row.items()}
        for k, v in item.items():
            if isinstance(v, pd.Timestamp):
                item[k] = v.date().isoformat() if domain == "customs" else v.isoformat()
        item[id_col] = f"T{time.time_ns()}-{i}"
        items.append(item)
    return items


def _score(server: Server, domain: str, items: list[dict], role: str | None = None, agency: str = "A",
           headers: dict | None = None) -> httpx.Response:
    route = "/score_shipments" if domain == "customs" else "/score_transactions"
    role = role or ("customs" if domain == "customs" else "financial")
    with server.client() as c:
        return c.post(route, json={"items": items}, headers={**server.headers(role, agency), **(headers or {})})


def _audit(server: Server) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{server.home / 'audit.db'}?mode=ro", uri=True)


# ---------------------------------------------------------------------------------------------- tests


def tiny_bundle(domain: str, names: list[str], rounds: int = 3, **fields):
    """A real LightGBM bundle over ``names``, fitted to random data in milliseconds: for tests of the serving
    machinery (history, state, audit, reload), not of the model."""
    import lightgbm as lgb

    from features.domains import feature_set
    from training.bundle import Calibrator, ModelBundle

    rng = np.random.default_rng(0)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_threads": 1},
                        lgb.Dataset(pd.DataFrame(rng.random((200, len(names))), columns=names),
                                    rng.integers(0, 2, 200)), num_boost_round=rounds)
    return ModelBundle(domain=domain, feature_names=list(names), categorical={}, feature_labels={}, booster=booster,
                       calibrator=Calibrator([0.0, 1.0], [0.0, 1.0]), threshold=0.5, bands={"high": 0.5},
                       feature_set_version=feature_set(domain).version, **fields)


@server_test
def test_health_ready_and_metrics(server: Server):
    with server.client() as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 200
        domains = ready.json()["domains"]
        assert set(domains) == {"customs", "finance"}
        assert domains["customs"]["model"] == {"name": "riskscore-customs", "version": "1"}
        assert domains["finance"]["model"]["name"] == "riskscore-finance"
        _score(server, "customs", _events(server, "customs", 2)).raise_for_status()
        text = c.get("/metrics").text
    assert 'riskscore_scores_total{' in text and 'domain="customs"' in text
    assert "riskscore_request_seconds_bucket" in text


@pytest.mark.parametrize("domain", ["customs", "finance"])
@server_test
def test_scores_and_explanations(server: Server, domain: str):
    items = _events(server, domain, 3)
    r = _score(server, domain, items)
    assert r.status_code == 200, r.text
    body = ScoreResponse.model_validate(r.json())
    assert body.domain == domain and r.headers["x-request-id"] == body.request_id
    assert [i.id for i in body.items] == [x["declaration_id" if domain == "customs" else "transaction_id"]
                                         for x in items]
    for item in body.items:
        assert 0.0 <= item.score <= 1.0
        assert item.flagged == (item.score >= item.threshold)
        assert item.model.name == f"riskscore-{domain}" and item.model.version == "1"
        assert 1 <= len(item.reasons) <= 5
        mags = [abs(x.contribution) for x in item.reasons]
        assert mags == sorted(mags, reverse=True)
        assert all(x.direction == ("raises risk" if x.contribution > 0 else "lowers risk") for x in item.reasons)
        shown = item.base_value + sum(x.contribution for x in item.reasons) + item.other_contribution
        assert shown == pytest.approx(item.raw_margin, abs=1e-9)  # the response adds up on its own


@pytest.mark.parametrize("domain", ["customs", "finance"])
@pytest.mark.filterwarnings("ignore::UserWarning")
@server_test
def test_shap_additivity_and_tree_explainer(server: Server, domain: str):
    import shap

    from training.registry import load_champion

    r = _score(server, domain, _events(server, domain, 2))
    assert r.status_code == 200, r.text
    details = []
    with server.client() as c:
        for item in r.json()["items"]:
            d = c.get(f"/scores/{item['score_id']}", headers=server.headers("reviewer"))
            assert d.status_code == 200, d.text
            d = d.json()
            assert d["score_id"] == item["score_id"] and d["raw_margin"] == item["raw_margin"]
            assert abs(d["base_value"] + sum(d["contributions"].values()) - d["raw_margin"]) < 1e-6
            details.append(d)
    with pytest.MonkeyPatch.context() as mp:
        for key in ("RISKSCORE_HOME", "MLFLOW_TRACKING_URI", "RISKSCORE_ARTIFACT_ROOT"):
            mp.setenv(key, server.env[key])
        bundle, _info = load_champion(domain)
    X = bundle.matrix(pd.DataFrame([d["features"] for d in details]).astype(
        {n: float for n in bundle.feature_names if n not in bundle.categorical}))
    explainer = shap.TreeExplainer(bundle.booster)
    values = np.asarray(explainer.shap_values(X)).reshape(len(details), -1)
    base = float(np.ravel(explainer.expected_value)[-1])
    for d, row in zip(details, values, strict=True):
        ours = np.array([d["contributions"][n] for n in bundle.feature_names])
        np.testing.assert_allclose(ours, row, atol=1e-6)
        assert abs(base - d["base_value"]) < 1e-6
        top = {x["feature"]: x["contribution"] for x in d["reasons"]}
        assert all(abs(d["contributions"][f] - v) < 1e-12 for f, v in top.items())


ENDPOINTS = {  # name -> (method, path, body) chosen so an authorised call has no side effect
    "score_shipments": ("POST", "/score_shipments", {"items": []}),
    "score_transactions": ("POST", "/score_transactions", {"items": []}),
    "get_score": ("GET", "/scores/00000000-0000-0000-0000-000000000000", None),
    "outcomes": ("POST", "/outcomes", {"score_id": "00000000-0000-0000-0000-000000000000", "outcome": "cleared"}),
    "reload": ("POST", "/admin/reload", {"domains": ["finance"]}),
}
ALLOWED = {  # endpoint -> roles let through (their reply is then 200/404/422, never 401/403)
    "score_shipments": {"customs"}, "score_transactions": {"financial"}, "get_score": {"reviewer", "admin"},
    "outcomes": {"reviewer"}, "reload": {"admin"},
}


@server_test
def test_auth_matrix(server: Server):
    with server.client() as c:
        for name, (method, path, body) in ENDPOINTS.items():
            for headers in ({}, {"Authorization": "Bearer rsk_not-a-key"}, {"X-API-Key": "nope"}):
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (name, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
            for role in ROLES_AGENCY_A:
                r = c.request(method, path, json=body, headers=server.headers(role))
                if role in ALLOWED[name]:
                    assert r.status_code in (200, 404, 422), (name, role, r.status_code, r.text)
                else:
                    assert r.status_code == 403, (name, role, r.status_code, r.text)
        key = server.keys[("customs", "A")]  # X-API-Key works like Bearer
        assert c.post("/score_shipments", json={"items": []}, headers={"X-API-Key": key}).status_code == 422
        for method, path, status in (("GET", "/no-such-route", 404), ("GET", "/score_shipments", 405)):
            r = c.request(method, path, headers={"X-API-Key": key})
            assert r.status_code == status and r.text.startswith("{"), (path, r.status_code, r.headers, r.text)
            assert r.json()["request_id"] and r.json()["error"], (path, r.text)


@server_test
def test_agency_separation(server: Server):
    a = _score(server, "customs", _events(server, "customs", 1), agency="A").json()["items"][0]["score_id"]
    b = _score(server, "customs", _events(server, "customs", 1, start=5), agency="B").json()["items"][0]["score_id"]
    with server.client() as c:
        assert c.get(f"/scores/{a}", headers=server.headers("reviewer", "A")).status_code == 200
        assert c.get(f"/scores/{b}", headers=server.headers("reviewer", "A")).status_code == 404
        assert c.get(f"/scores/{b}", headers=server.headers("reviewer", "B")).status_code == 200
        assert c.get(f"/scores/{a}", headers=server.headers("reviewer", "B")).status_code == 404
        assert c.get(f"/scores/{b}", headers=server.headers("admin", "A")).json()["agency"] == "B"
        r = c.post("/outcomes", json={"score_id": b, "outcome": "confirmed"}, headers=server.headers("reviewer", "A"))
        assert r.status_code == 404


def _bad_requests(server: Server) -> dict[str, tuple[str, object, int, str | None]]:
    """name -> (domain, body, status, expected error location)."""
    decl = _events(server, "customs", 3)
    tx = _events(server, "finance", 3)

    def edit(items, i, **changes):
        out = [dict(x) for x in items]
        for k, v in changes.items():
            if v is KeyError:
                del out[i][k]
            else:
                out[i][k] = v
        return {"items": out}

    return {
        "missing_field": ("customs", edit(decl, 2, importer_id=KeyError), 422, "items.2.importer_id"),
        "wrong_type": ("customs", edit(decl, 1, net_mass="heavy"), 422, "items.1.net_mass"),
        "wrong_type_date": ("customs", edit(decl, 0, date=20210101), 422, "items.0.date"),
        "bad_country": ("customs", edit(decl, 1, country_origin="China"), 422, "items.1.country_origin"),
        "bad_hs6": ("customs", edit(decl, 2, hs6="39269"), 422, "items.2.hs6"),
        "negative_amount": ("finance", edit(tx, 2, amount=-10.0), 422, "items.2.amount"),
        "zero_amount": ("finance", edit(tx, 0, amount=0), 422, "items.0.amount"),
        "bad_currency": ("finance", edit(tx, 1, currency="usd"), 422, "items.1.currency"),
        "unknown_field": ("finance", edit(tx, 1, is_laundering=1), 422, "items.1.is_laundering"),
        "duplicate_id": ("finance", edit(tx, 2, transaction_id=tx[0]["transaction_id"]), 422,
                         "items.2.transaction_id"),
        "empty_batch": ("customs", {"items": []}, 422, "items"),
        "no_items": ("customs", {"rows": decl}, 422, "items"),
        "not_an_object": ("customs", [1, 2], 422, "body"),
        "oversized_batch": ("finance", {"items": tx[:1] * 1001}, 422, "items"),
        "malformed_json": ("customs", b'{"items": [', 400, None),
        "nan_literal": ("finance", json.dumps(edit(tx, 0, amount=float("nan"))).encode(), 400, None),
        "time_overflowing_utc": ("finance", edit(tx, 1, timestamp="9999-12-31T23:59:59-01:00"), 422,
                                 "items.1.timestamp"),
        "unix_time_text": ("finance", edit(tx, 0, timestamp="1700000000"), 422, "items.0.timestamp"),
        "overflowing_amount": ("finance", edit(tx, 2, amount=1e308), 422, "items.2.amount"),
        "huge_payload": ("customs", b'{"items": ["' + b"x" * (3 * 1024 * 1024) + b'"]}', 413, None),
    }


def test_bad_input_is_a_4xx_with_field_locations(server: Server):
    before = _audit_count(server)
    with server.client() as c:
        for name, (domain, body, status, loc) in _bad_requests(server).items():
            route = "/score_shipments" if domain == "customs" else "/score_transactions"
            role = "customs" if domain == "customs" else "financial"
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = c.post(route, headers={**server.headers(role), "Content-Type": "application/json"}, **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text[:500])
            payload = r.json()
            assert payload["error"] and payload["request_id"], name
            assert r.headers.get_list("x-request-id") == [payload["request_id"]], name
            if loc is not None:
                assert loc in [d["loc"] for d in payload["detail"]], (name, payload)
    assert _audit_count(server) == before


def _audit_count(server: Server, request_id: str | None = None) -> int:
    with _audit(server) as db:
        if request_id is None:
            return db.execute("select count(*) from scores").fetchone()[0]
        return db.execute("select count(*) from scores where request_id = ?", (request_id,)).fetchone()[0]


@server_test
def test_audit_row_per_item_without_secrets(server: Server):
    r = _score(server, "finance", _events(server, "finance", 4, start=10))
    assert r.status_code == 200
    body = r.json()
    with _audit(server) as db:
        rows = db.execute("select score_id, caller_key_id, agency, model_version, input_json, features_json, score, "
                          "explanation_json from scores where request_id = ? order by item_index",
                          (body["request_id"],)).fetchall()
        dump = "\n".join(db.iterdump())
    assert [row[0] for row in rows] == [i["score_id"] for i in body["items"]]
    key = server.keys[("financial", "A")]
    assert all(row[1] == auth.hash_key(key)[:12] and row[2] == "A" and row[3] == "1" for row in rows)
    assert all(abs(row[6] - i["score"]) < 1e-12 for row, i in zip(rows, body["items"], strict=True))
    assert len(json.loads(rows[0][7])["contributions"]) > 10
    deadline = time.monotonic() + 10  # the access line is written just after the response is sent
    while True:
        log_text = server.log.read_text()
        lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{") and '"request"' in line]
        mine = [x for x in lines if x.get("request_id") == body["request_id"]]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for secret in server.keys.values():
        assert secret not in dump and secret not in log_text
    assert len(mine) == 1 and mine[0]["status"] == 200 and mine[0]["items"] == 4 and "latency_ms" in mine[0]


@server_test
def test_outcome_becomes_case_and_label(server: Server):
    from serving.audit import AuditStore

    items = _events(server, "customs", 1, start=20)
    score_id = _score(server, "customs", items).json()["items"][0]["score_id"]
    tx_id = _score(server, "finance", _events(server, "finance", 1, start=30)).json()["items"][0]["score_id"]
    with server.client() as c:
        r = c.post("/outcomes", json={"score_id": score_id, "outcome": "confirmed", "note": "undervalued"},
                   headers=server.headers("reviewer"))
        assert r.status_code == 201, r.text
        assert r.json()["outcome"] == "confirmed"
        reviewer = server.headers("reviewer")
        again = c.post("/outcomes", json={"score_id": score_id, "outcome": "cleared"}, headers=reviewer)
        assert again.status_code == 409
        bad = c.post("/outcomes", json={"score_id": score_id, "outcome": "maybe"}, headers=reviewer)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == "outcome"
        assert c.post("/outcomes", json={"score_id": tx_id, "outcome": "cleared"},
                      headers=server.headers("reviewer")).status_code == 201
        shown = c.get(f"/scores/{score_id}", headers=server.headers("reviewer")).json()
    assert shown["outcome"]["outcome"] == "confirmed"
    store = AuditStore(f"sqlite:///{server.home / 'audit.db'}")
    try:
        cases = store.export_cases("customs")
        mine = cases[cases["case_id"].str.startswith(score_id)]
        expected = {"importer": items[0]["importer_id"], "declarant": items[0]["declarant_id"]}
        if items[0].get("seller_id"):
            expected["seller"] = items[0]["seller_id"]
        assert dict(zip(mine["entity_kind"], mine["entity_id"], strict=True)) == expected
        assert set(mine["outcome"]) == {"confirmed"} and set(mine["source"]) == {"reviewer"}
        from features.schemas import validate_table

        validate_table(cases, "cases", "export")
        fin = store.export_cases("finance")
        assert len(fin[fin["case_id"].str.startswith(tx_id)]) == 2
        assert set(fin["entity_kind"]) == {"account"}
        labelled = store.export_labelled_events("customs")
        row = labelled[labelled["declaration_id"] == items[0]["declaration_id"]]
        assert row["fraud"].tolist() == [1]
        validate_table(labelled, "declarations", "export")
    finally:
        store.close()
    # the next training run reads the outcome: the case and the reviewed event (label 1) are in its data
    from training.pipeline import TrainConfig, load_training_data, train

    audit_url = f"sqlite:///{server.home / 'audit.db'}"
    result = train("customs", server.data["customs"],
                   config=TrainConfig(track=False, quiet=True, num_threads=1, audit_url=audit_url))
    assert result.data.reviewed >= 1
    assert set(mine["case_id"]) <= set(result.data.cases["case_id"])
    reviewed = result.data.events[result.data.events["declaration_id"] == items[0]["declaration_id"]]
    assert reviewed["fraud"].tolist() == [1]
    without = load_training_data("customs", server.data["customs"],
                                 TrainConfig(audit_url=audit_url, reviewer_outcomes=False))
    assert without.reviewed == 0 and not set(mine["case_id"]) & set(without.cases["case_id"])


@server_test
def test_idempotent_retry(server: Server):
    items = _events(server, "customs", 2, start=40)
    headers = {"Idempotency-Key": f"retry-{time.time_ns()}"}
    first = _score(server, "customs", items, headers=headers)
    second = _score(server, "customs", items, headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.json() == first.json() and second.headers.get("idempotent-replayed") == "true"
    assert _audit_count(server, first.json()["request_id"]) == 2
    with _audit(server) as db:
        ids = [i["score_id"] for i in first.json()["items"]]
        assert db.execute(f"select count(*) from scores where score_id in ({','.join('?' * len(ids))})",
                          ids).fetchone()[0] == 2
    other = _score(server, "customs", items[:1], headers=headers)
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["error"]


@server_test
def test_reload_swaps_champion_under_load(server: Server):
    """Train a second customs model, promote it, reload while requests run: none fails, versions switch once."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("RISKSCORE_HOME", "MLFLOW_TRACKING_URI", "RISKSCORE_ARTIFACT_ROOT"):
            mp.setenv(key, server.env[key])
        version = _train("customs", server.data["customs"], seed=1)
        _promote("customs", version)
    assert version == "2"
    pool = _events(server, "customs", 40, start=60)
    results: list[tuple[int, str]] = []
    reloaded = threading.Event()

    def load() -> None:
        with server.client() as c:
            for i in range(400):  # bounded
                item = dict(pool[i % len(pool)], declaration_id=f"L{i}-{time.time_ns()}")
                r = c.post("/score_shipments", json={"items": [item]}, headers=server.headers("customs"))
                results.append((r.status_code, r.json()["items"][0]["model"]["version"] if r.is_success else r.text))
                if reloaded.is_set() and sum(1 for _, v in results[-5:] if v == "2") == 5:
                    return

    worker = threading.Thread(target=load)
    worker.start()
    try:
        while len(results) < 3 and worker.is_alive():
            time.sleep(0.05)
        with server.client() as c:
            r = c.post("/admin/reload", headers=server.headers("admin"))
        assert r.status_code == 200, r.text
        assert r.json()["domains"]["customs"] == {"previous_version": "1", "version": "2", "changed": True}
        assert r.json()["domains"]["finance"]["changed"] is False
    finally:
        reloaded.set()
        worker.join(timeout=120)
    assert not worker.is_alive()
    failures = [x for x in results if x[0] != 200]
    assert not failures, failures[:3]
    versions = "".join(v for _, v in results)
    assert versions.startswith("1") and versions.endswith("22222") and "21" not in versions, versions
    with server.client() as c:
        assert c.get("/readyz").json()["domains"]["customs"]["model"]["version"] == "2"


# ---------------------------------------------------------------------------------------------- no server


def test_demo_keys_are_private_and_hashed(tmp_path, monkeypatch):
    monkeypatch.setenv("RISKSCORE_HOME", str(tmp_path))
    for var in ("RISKSCORE_KEYS_FILE", "RISKSCORE_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    store = auth.load_keys()
    path = tmp_path / "demo-keys.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    demo = {k["role"]: k["key"] for k in json.loads(path.read_text())["keys"]}
    assert set(demo) == set(auth.ROLES)
    assert all(len(e.sha256) == 64 and e.sha256 not in demo.values() for e in store.entries)
    assert store.authorize(demo["reviewer"], "scores:read").agency == auth.DEMO_AGENCY
    with pytest.raises(auth.AuthError) as wrong_role:
        store.authorize(demo["reviewer"], "score:customs")
    assert wrong_role.value.status == 403
    with pytest.raises(auth.AuthError) as unknown:
        store.authorize(demo["reviewer"] + "x", "scores:read")
    assert unknown.value.status == 401
    assert auth.load_keys().entries == store.entries  # the demo file is reused, not regenerated


def test_env_keys_hold_hashes_only(monkeypatch):
    key = auth.new_key()
    monkeypatch.delenv("RISKSCORE_KEYS_FILE", raising=False)
    monkeypatch.setenv("RISKSCORE_API_KEYS", f"admin:HQ:{auth.hash_key(key)}, customs:HQ:{'0' * 64}")
    store = auth.load_keys()
    assert store.authorize(key, "admin").role == "admin"
    monkeypatch.setenv("RISKSCORE_API_KEYS", f"boss:HQ:{auth.hash_key(key)}")
    with pytest.raises(ValueError, match="unknown role"):
        auth.load_keys()


def test_serve_refuses_a_domain_without_champion(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from serving.cli import serve_cmd

    monkeypatch.setenv("RISKSCORE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    result = CliRunner().invoke(serve_cmd, ["--domains", "finance", "--port", str(_free_port())])
    assert result.exit_code == 1
    assert "domain 'finance'" in result.output and "riskscore train --domain finance" in result.output


def test_keys_cli_and_toml_key_file(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from serving.cli import keys_cmd

    path = tmp_path / "keys.json"
    added = CliRunner().invoke(keys_cmd, ["add", "--role", "reviewer", "--agency", "Customs-NL", "--file", str(path)])
    assert added.exit_code == 0, added.output
    key = added.stdout.strip().splitlines()[-1]
    assert key.startswith(auth.KEY_PREFIX) and key not in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    listed = CliRunner().invoke(keys_cmd, ["list", "--file", str(path)])
    assert listed.output.split() == [auth.hash_key(key)[:12], "reviewer", "Customs-NL"]
    toml = tmp_path / "keys.toml"
    toml.write_text(f'[[keys]]\nsha256 = "{auth.hash_key(key)}"\nrole = "reviewer"\nagency = "Customs-NL"\n')
    for source in (path, toml):
        monkeypatch.setenv("RISKSCORE_KEYS_FILE", str(source))
        assert auth.load_keys().authenticate(key).agency == "Customs-NL"
    before = toml.read_text()  # revoking from TOML would rewrite it as JSON: refused, the file is unchanged
    refused = CliRunner().invoke(keys_cmd, ["revoke", auth.hash_key(key)[:12], "--file", str(toml)])
    assert refused.exit_code != 0 and "TOML" in str(refused.exception) and toml.read_text() == before
    revoked = CliRunner().invoke(keys_cmd, ["revoke", auth.hash_key(key)[:12], "--file", str(path)])
    assert revoked.exit_code == 0 and auth.read_key_file(path) == []


def test_key_ids_are_unique_and_fit_the_audit_trail():
    """The key id names the caller in audit rows and scopes Idempotency-Keys: two keys sharing one (say two
    agencies' desks both called 'customs-desk') would replay each other's responses, so the store refuses them."""
    one, two = (auth.hash_key(auth.new_key()) for _ in range(2))
    desk = {"role": "customs", "id": "customs-desk"}
    with pytest.raises(ValueError, match="same id"):
        auth.KeyStore(auth._entries([{**desk, "sha256": one, "agency": "A"},
                                     {**desk, "sha256": two, "agency": "B"}]), "keys.json")
    with pytest.raises(ValueError, match="same sha256"):
        auth.KeyStore(auth._entries([{"sha256": one, "role": "customs", "agency": a} for a in "AB"]), "keys.json")
    with pytest.raises(ValueError, match="1 to 16"):
        auth._entries([{**desk, "sha256": one, "agency": "A", "id": "a-desk-name-longer-than-16"}])
    with pytest.raises(ValueError, match="at most 64"):  # the agency columns: PostgreSQL refused every write
        auth._entries([{**desk, "sha256": one, "agency": "A" * 65}])
    store = auth.KeyStore(auth._entries([{**desk, "sha256": one, "agency": "A"}, {"sha256": two, "role": "customs",
                                                                                 "agency": "B"}]), "keys.json")
    assert [e.id for e in store.entries] == ["customs-desk", two[:12]]


def test_history_is_the_data_the_champion_was_trained_and_tested_on(tmp_path, monkeypatch):
    """The online state starts from every dataset the champion's run read (training and evaluation file), so no
    months are missing between the training data and the first scored event; the variable overrides it."""
    from types import SimpleNamespace

    from serving.scorer import ServingConfigError, history_paths, load_history
    from training.bundle import ModelBundle

    raw = pd.read_csv(REPO / "tests" / "fixtures" / "customs_public_sample.csv", dtype=str, keep_default_na=False)
    raw.iloc[:200].to_csv(tmp_path / "train.csv", index=False)
    raw.iloc[200:].to_csv(tmp_path / "valid.csv", index=False)
    bundle = SimpleNamespace(data_path=str(tmp_path / "train.csv"),
                             data_paths=[str(tmp_path / "train.csv"), str(tmp_path / "valid.csv")])
    bundle.history_paths = lambda: ModelBundle.history_paths(bundle)
    monkeypatch.delenv("RISKSCORE_HISTORY_CUSTOMS", raising=False)
    paths = history_paths("customs", bundle)
    assert [p.name for p in paths] == ["train.csv", "valid.csv"]
    events, cases = load_history("customs", paths)
    assert len(events) == 300 and events["date"].is_monotonic_increasing and len(cases)
    older = SimpleNamespace(data_path=str(tmp_path / "train.csv"))  # a bundle from before data_paths
    assert ModelBundle.history_paths(older) == [str(tmp_path / "train.csv")]
    monkeypatch.setenv("RISKSCORE_HISTORY_CUSTOMS", os.pathsep.join([str(tmp_path / "valid.csv")]))
    assert [p.name for p in history_paths("customs", bundle)] == ["valid.csv"]
    monkeypatch.setenv("RISKSCORE_HISTORY_CUSTOMS", "none")
    assert history_paths("customs", bundle) == [] and load_history("customs", []) == (None, None)
    monkeypatch.setenv("RISKSCORE_HISTORY_CUSTOMS", os.pathsep.join([str(tmp_path / "train.csv"),
                                                                      str(tmp_path / "gone.csv")]))
    with pytest.raises(ServingConfigError, match=r"gone\.csv"):
        history_paths("customs", bundle)


def test_service_history_uses_the_models_label_delay(tmp_path):
    """Cases derived from the history's labels open to features after the champion's label delay, as in its
    training: online features of a new declaration equal the batch features with that delay."""
    from features.datasets import load_datasets
    from features.domains import feature_set
    from serving.audit import AuditStore
    from serving.scorer import DomainScorer

    data_file = REPO / "tests" / "fixtures" / "customs_public_sample.csv"
    events = load_datasets("customs", [data_file]).declarations
    fraud = events[events["fraud"] == 1].iloc[-1]
    end = events["date"].max()
    delay = (end - fraud["date"]).days + 5.0  # the last fraud's case is not known yet one day after the end
    fs = feature_set("customs", delay)
    new = events[events["declaration_id"] == fraud["declaration_id"]].copy()
    new["declaration_id"], new["date"], new["fraud"] = "NEW-1", end + pd.Timedelta(days=1), pd.NA
    both = pd.concat([events, new.astype(events.dtypes.to_dict())], ignore_index=True)
    batch = fs.build(both, load_datasets("customs", [data_file], delay).cases).iloc[[-1]].reset_index(drop=True)

    bundle = tiny_bundle("customs", fs.names[:1], label_delay_days=delay, data_paths=[str(data_file)])
    audit = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        scorer = DomainScorer.build("customs", audit, (bundle, "riskscore-customs", "1"))
    finally:
        audit.close()
    online = scorer.online.features(new.drop(columns=["fraud"])).reset_index(drop=True)
    pd.testing.assert_frame_equal(online[fs.names], batch[fs.names], check_dtype=False)
    assert batch["importer_confirmed_cases_90d"].iloc[0] == 0  # the delay matters for this event
    undelayed = feature_set("customs", 0.0).build(both, load_datasets("customs", [data_file], 0.0).cases)
    assert undelayed["importer_confirmed_cases_90d"].iloc[-1] >= 1


def test_an_event_scored_again_counts_once_as_after_a_restart(tmp_path):
    """A second scoring of an event id (a retry without Idempotency-Key, an analyst re-checking it, an event of the
    history) is scored but not counted again: later features are what a restarted service, which replays the
    first scoring of each id, computes for the same item."""

    from features.datasets import load_dataset
    from features.domains import events_of
    from serving.audit import AuditStore
    from serving.models import parse_batch
    from serving.scorer import DomainScorer, RequestMeta

    data_dir = REPO / "tests" / "fixtures" / "amlsim_sample"
    names = ["src_out_count", "src_out_count_1h", "src_out_amount_24h", "pair_count", "pair_amount"]
    bundle = tiny_bundle("finance", names, data_paths=[str(data_dir)])
    last = events_of(load_dataset("finance", data_dir)).iloc[-1]
    old = {k: (v.isoformat() if isinstance(v, pd.Timestamp) else v) for k, v in last.items() if k != "is_laundering"}
    end = last["timestamp"]

    def item(tid: str, minutes: int) -> dict:
        return {**old, "transaction_id": tid, "timestamp": (end + pd.Timedelta(minutes=minutes)).isoformat(),
                "amount": 9500.0}

    def score(scorer: DomainScorer, audit: AuditStore, *items: dict) -> list[dict]:
        body = json.dumps({"items": list(items)}).encode()
        meta = RequestMeta(key_id="k", agency="A", request_id=f"r{time.time_ns()}")
        with scorer.lock:
            result = scorer.score(parse_batch("finance", json.loads(body)), meta, body, audit)
        return [audit.get_score(i["score_id"])["features_json"] for i in result.response["items"]]

    audit = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        live = DomainScorer.build("finance", audit, (bundle, "riskscore-finance", "1"))
        first = score(live, audit, item("X-1", 10))[0]
        again = score(live, audit, item("X-1", 10), old)  # X-1 a second time, and an event of the history
        assert again[0] == first  # same state before it, same features
        later = score(live, audit, item("Y-1", 65))[0]
        assert later["src_out_count_1h"] == 1 and later["pair_amount"] == first["pair_amount"] + 9500
        restarted = DomainScorer.build("finance", audit, (bundle, "riskscore-finance", "1"))
        assert restarted.online.events_seen == live.online.events_seen == 1021 + 2  # history, X-1, Y-1
        assert score(restarted, audit, item("Y-2", 65))[0] == later
    finally:
        audit.close()


@pytest.mark.parametrize("field, value, message", [
    ("timestamp", "9999-12-31T23:59:59-01:00", "year must be between"),  # its UTC time overflowed: was a 500
    ("timestamp", "0001-01-01T00:00:00+01:00", "year must be between"),
    # in range as sent, not in UTC, which the audit store keeps: its replay failed validation and broke the state
    ("timestamp", "1990-01-01T01:00:00+05:00", "year must be between"),
    ("timestamp", "2100-12-31T23:30:00-05:00", "year must be between"),
    ("timestamp", "1700000000", "ISO 8601 time"),  # a quoted number was read as a Unix time
    ("timestamp", "20230624", "ISO 8601 time"),
    ("amount", 1e308, "less than or equal to"),  # sums of such amounts overflow to infinity in the features
])
def test_times_and_quantities_out_of_range_are_field_errors(field, value, message):
    from serving.models import RequestError, parse_batch, stored_item_columns

    item = {"transaction_id": "T-1", "timestamp": "2023-06-25T00:00:59", "source_account": "A1",
            "target_account": "B2", "amount": 9500.0, "currency": "USD", "channel": "wire",
            "source_country": "US", "target_country": "GB"}
    assert parse_batch("finance", {"items": [item]})[0].amount == 9500.0
    with pytest.raises(RequestError) as err:
        parse_batch("finance", {"items": [{**item, field: value}]})
    assert err.value.status == 422 and err.value.detail[0]["loc"] == f"items.0.{field}"
    assert message in err.value.detail[0]["msg"]
    offset = parse_batch("finance", {"items": [{**item, "timestamp": "1990-01-01T06:00:00+05:00"}]})[0]
    assert offset.timestamp.isoformat() == "1990-01-01T01:00:00"  # UTC is stored
    stored = stored_item_columns("finance", [offset.model_dump(mode="json")])  # as the state replays it
    assert stored["timestamp"][0] == np.datetime64("1990-01-01T01:00:00")


def test_reviewer_label_counts_from_its_decision_in_training_as_in_serving(tmp_path, monkeypatch):
    """A reviewer's outcome is known from its decision, not from event time + delay: a declaration between the two
    must not see it, in the training features (outcomes read from the audit store) as in the service."""
    import datetime as dt
    import uuid

    from features.domains import feature_set
    from serving.audit import AuditStore, events_frame
    from serving.fast_path import features_in_time_order
    from serving.models import Declaration
    from serving.scorer import DomainScorer
    from training.outcomes import read_reviewer_outcomes

    base = {"office_id": "O1", "process_type": "P", "import_type": "I", "import_use": "U", "payment_type": "PT",
            "transport_mode": "T", "declarant_id": "DEC1", "importer_id": "IMPX", "seller_id": "S1",
            "courier_id": None, "hs6": "392690", "country_departure": "CN", "country_origin": "CN", "tax_rate": 8.0,
            "tax_type": "A", "origin_indicator": "G", "net_mass": 100.0, "item_price": 1000.0}

    def item(did: str, day: int) -> dict:
        return Declaration(declaration_id=did, date=f"2024-03-{day:02d}", **base).model_dump(mode="json")

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    audit = AuditStore(url)
    first = item("A", 1)
    row = {"score_id": str(uuid.uuid4()), "request_id": "r1", "item_index": 0, "created_at": dt.datetime(2024, 3, 1),
           "domain": "customs", "event_id": "A", "caller_key_id": "k", "agency": "ag", "model_name": "m",
           "model_version": "1", "input_json": first, "features_json": {}, "score": 0.9, "band": "high",
           "flagged": True, "threshold": 0.5, "explanation_json": {}}
    audit.record_scores({"request_id": "r1", "created_at": dt.datetime(2024, 3, 1), "domain": "customs",
                         "caller_key_id": "k", "agency": "ag", "idempotency_key": None, "body_sha256": "x",
                         "items": 1}, [row], {})
    audit.record_outcome(row["score_id"], "confirmed", None, "rev", "ag", decided_at=dt.datetime(2024, 3, 6, 12))
    later = [item("B", 3), item("C", 8)]  # before and after the decision

    fs = feature_set("customs", 0.0)
    reviewed = read_reviewer_outcomes("customs", url)
    training = fs.build(pd.concat([reviewed.events, events_frame("customs", later)], ignore_index=True),
                        reviewed.cases).iloc[1:].reset_index(drop=True)
    monkeypatch.setenv("RISKSCORE_HISTORY_CUSTOMS", "none")
    bundle = tiny_bundle("customs", fs.names[:1])
    try:
        scorer = DomainScorer.build("customs", audit, (bundle, "riskscore-customs", "1"))
    finally:
        audit.close()
    serving = features_in_time_order(scorer.online, events_frame("customs", later)).reset_index(drop=True)
    pd.testing.assert_frame_equal(training[fs.names], serving[fs.names], check_dtype=False)
    assert training["importer_label_rate"].iloc[1] > training["importer_label_rate"].iloc[0]  # C sees it, B not


def test_a_failed_audit_write_never_leaves_its_event_in_the_features(tmp_path, monkeypatch):
    """The batch is in the online state before its audit commit. If anything fails before the commit (the write
    itself, or an explanation error), the scorer refuses requests (503) until one rebuild from the store has
    replaced it, so no later score counts an event the audit trail lacks."""

    from features.datasets import load_dataset
    from features.domains import events_of
    from serving import scorer as scorer_module
    from serving.audit import AuditStore
    from serving.models import RequestError, parse_batch
    from serving.scorer import DomainScorer, RequestMeta, ScorerRegistry

    data_dir = REPO / "tests" / "fixtures" / "amlsim_sample"
    bundle = tiny_bundle("finance", ["src_out_count", "src_out_count_1h", "src_out_amount_24h"],
                         data_paths=[str(data_dir)])
    builds = []
    real_build = DomainScorer.build

    def counted_build(domain, audit, champion=None):
        builds.append(domain)
        return real_build(domain, audit, champion)

    monkeypatch.setattr(scorer_module, "load_champion", lambda domain: (bundle, "riskscore-finance", "1"))
    monkeypatch.setattr(DomainScorer, "build", staticmethod(counted_build))
    last = events_of(load_dataset("finance", data_dir)).iloc[-1]
    end = last["timestamp"]
    base = {k: (v.isoformat() if isinstance(v, pd.Timestamp) else v) for k, v in last.items() if k != "is_laundering"}

    def score(tid: str, minutes: int) -> dict:
        item = {**base, "transaction_id": tid, "timestamp": (end + pd.Timedelta(minutes=minutes)).isoformat()}
        body = json.dumps({"items": [item]}).encode()
        meta = RequestMeta(key_id="k", agency="A", request_id=f"r{time.time_ns()}")
        result = registry.run("finance", lambda s: s.score(parse_batch("finance", json.loads(body)), meta, body, audit))
        return audit.get_score(result.response["items"][0]["score_id"])["features_json"]

    audit = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    registry = ScorerRegistry(["finance"], audit)
    try:
        registry.start()
        for failure in ("write", "explain"):
            failing = registry.get("finance")
            target = (audit, "record_scores") if failure == "write" else (scorer_module, "explain")
            real = getattr(*target)
            monkeypatch.setattr(*target, lambda *a, **k: (_ for _ in ()).throw(OSError("database or disk is full")))
            with pytest.raises(OSError):
                score(f"LOST-{failure}", 10)
            monkeypatch.setattr(*target, real)
            # a new champion meanwhile: the rebuild keeps the failed scorer's model (only a reload switches)
            monkeypatch.setattr(scorer_module, "load_champion", lambda domain: (None, "riskscore-finance", "2"))
            refused = 0
            deadline = time.monotonic() + 60
            while registry.get("finance") is failing:  # 503 while the one rebuild runs
                with pytest.raises(RequestError) as err:
                    score(f"EARLY-{refused}", 20)
                assert err.value.status == 503 and err.value.retry_after
                refused += 1
                assert time.monotonic() < deadline, "the stale scorer was not replaced"
                time.sleep(0.05)
            assert failing.retired and not registry.get("finance").stale
            assert (registry.get("finance").bundle, registry.get("finance").model_version) == (bundle, "1")
        after = score("AFTER", 30)
        # the sender's transfers in the last hour: the history's last one only; neither lost event is counted
        assert after["src_out_count_1h"] == 1
        assert builds.count("finance") == 3  # the start, then exactly one rebuild per failure
    finally:
        registry.stop()
        audit.close()

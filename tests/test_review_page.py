"""The reviewer workspace (``/review``): audit queries, the explanation chart, and the pages end to end.

The server tests reuse the module-scoped ``server`` fixture of ``tests/test_service.py`` (a real BentoML
server on 127.0.0.1 with two agencies' keys). The browser test drives Debian's chromium headless with
Playwright; without chromium (or playwright) it skips with the reason, unless ``CI`` is set, where it fails.
It writes a screenshot of the item page to ``docs/review-page.png`` and ``tests/artifacts/``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from serving import auth
from serving.audit import AuditStore
from serving.review import charts
from tests import test_service as service_tests
from tests.test_service import Server, _events, _score, server_test

server = service_tests.server  # the module-scoped real server fixture (a server of this module's own)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("RISKSCORE_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = REPO / "docs" / "review-page.png"
ARTIFACTS = REPO / "tests" / "artifacts"


# ------------------------------------------------------------------------------------ audit store queries


def _store_with_rows(tmp_path: Path) -> tuple[AuditStore, list[str]]:
    """Eight scored items: 2 agencies x 2 domains x 2 times, increasing scores; finance transfers share accounts."""
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    t0 = dt.datetime(2024, 5, 1, 12)
    ids = []
    for i in range(8):
        agency = "A" if i % 2 == 0 else "B"
        domain = "customs" if i < 4 else "finance"
        created = t0 + dt.timedelta(days=i)
        score = 0.1 + 0.1 * i
        sid = f"s{i}"
        ids.append(sid)
        if domain == "finance":
            item = {"transaction_id": f"tx{i}", "timestamp": f"2024-05-0{i + 1}T10:00:00",
                    "source_account": "ACC1", "target_account": f"ACC{10 + i}", "amount": 100.0 * i,
                    "currency": "EUR", "channel": "web", "source_country": "NL", "target_country": "CY"}
        else:
            item = {"declaration_id": f"d{i}", "importer_id": "IMP1", "declarant_id": "DEC1"}
        store.record_scores(
            {"request_id": f"r{i}", "created_at": created, "domain": domain, "caller_key_id": "k", "agency": agency,
             "idempotency_key": None, "body_sha256": "0" * 64, "items": 1},
            [{"score_id": sid, "request_id": f"r{i}", "item_index": 0, "created_at": created, "domain": domain,
              "event_id": f"e{i}", "caller_key_id": "k", "agency": agency, "model_name": f"riskscore-{domain}",
              "model_version": "1", "input_json": item, "features_json": {"f": 1.0}, "score": score,
              "band": "high" if score >= 0.5 else "low", "flagged": score >= 0.5, "threshold": 0.5,
              "explanation_json": {"base_value": -2.0, "raw_margin": 0.5, "contributions": {"f": 2.5},
                                   "reasons": [{"feature": "f", "label": "Feature f", "value": 1.0,
                                                "contribution": 2.5, "direction": "raises risk"}]}}],
            {"items": []})
    return store, ids


def test_review_queue_filters_order_and_pages(tmp_path):
    store, _ids = _store_with_rows(tmp_path)
    try:
        store.record_outcome("s4", "confirmed", "ok", "k", "A")
        store.record_outcome("s6", "cleared", None, "k", "A")
        everything = store.review_queue(flagged=None, limit=100)
        assert everything.total == 8 and [r["score_id"] for r in everything.rows] == [f"s{i}" for i in range(7, -1, -1)]
        mine = store.review_queue(agency="A", flagged=None, limit=100)
        assert [r["score_id"] for r in mine.rows] == ["s6", "s4", "s2", "s0"]
        assert [r["status"] for r in mine.rows] == ["cleared", "confirmed", "open", "open"]
        assert mine.rows[0]["top_reason"]["label"] == "Feature f"
        assert [r["score_id"] for r in store.review_queue(agency="A").rows] == ["s6", "s4"]  # flagged only
        assert store.review_queue(agency="A", status="open", flagged=None).total == 2
        assert [r["score_id"] for r in store.review_queue(status="confirmed").rows] == ["s4"]
        assert [r["score_id"] for r in store.review_queue(domain="customs", band="low", flagged=None).rows] == [
            "s3", "s2", "s1", "s0"]
        window = store.review_queue(flagged=None, since=dt.datetime(2024, 5, 3), until=dt.datetime(2024, 5, 5))
        assert [r["score_id"] for r in window.rows] == ["s3", "s2"]
        risky = store.review_queue(flagged=None, order="risk", limit=3, offset=3)
        assert risky.total == 8 and [r["score_id"] for r in risky.rows] == ["s4", "s3", "s2"]
        with pytest.raises(ValueError, match="status"):
            store.review_queue(status="maybe")
        out = store.get_outcome("s4")
        assert out["decided_by"] == "k" and out["outcome"] == "confirmed" and store.get_outcome("s0") is None
    finally:
        store.close()


def test_counterparties_and_account_cases(tmp_path):
    store, _ids = _store_with_rows(tmp_path)
    try:
        store.record_outcome("s6", "confirmed", None, "k", "A")
        parties = store.counterparties("ACC1", agency="A")
        assert [p["account"] for p in parties] == ["ACC16", "ACC14"]  # agency A's transfers, most recent first
        assert parties[0]["directions"] == ["sent to"] and parties[0]["amounts"] == {"EUR": 600.0}
        assert parties[0]["country"] == "CY" and parties[0]["transfers"] == 1
        assert [p["account"] for p in store.counterparties("ACC1")] == ["ACC17", "ACC16", "ACC15", "ACC14"]
        back = store.counterparties("ACC15")
        assert [(p["account"], p["directions"]) for p in back] == [("ACC1", ["received from"])]
        cases = store.account_cases(["ACC1", "ACC16", "ACC14", "ACC1"], agency="A")
        assert cases["ACC1"]["confirmed"] == 1 and cases["ACC16"]["confirmed"] == 1
        assert cases["ACC14"] == {"confirmed": 0, "cleared": 0, "last_outcome": None, "last_decided_at": None}
        assert store.account_cases(["ACC1"], agency="B")["ACC1"]["confirmed"] == 0
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- the chart


def test_waterfall_adds_up_to_the_model_output():
    reasons = [{"feature": "a", "label": "Amount vs history", "value": 12500.0, "contribution": 1.2},
               {"feature": "b", "label": "New counterparty", "value": 1, "contribution": -0.4},
               {"feature": "c", "label": "Corridor risk", "value": 0.0312, "contribution": 0.3}]
    chart = charts.waterfall(-2.0, reasons, -0.7, n_features=40)
    kinds = [s.kind for s in chart.steps]
    assert kinds == ["base", "up", "down", "up", "other", "total"]
    assert chart.steps[1].start == -2.0 and abs(chart.steps[3].end - (-0.9)) < 1e-12
    other = chart.steps[4]
    assert abs(other.amount - 0.2) < 1e-12 and other.label == "All 37 other factors together"
    assert chart.steps[-1].end == -0.7 and chart.steps[-1].text == "-0.70"
    assert [s.value for s in chart.steps[1:4]] == ["12,500", "1", "0.0312"]
    assert [s.text for s in chart.steps[1:4]] == ["+1.20", "−0.40", "+0.30"]
    for s in chart.steps:  # every bar inside the plot, in row order
        assert chart.plot_left <= s.x and s.x + s.w <= chart.plot_right + 2
    assert [s.y for s in chart.steps] == sorted(s.y for s in chart.steps)
    assert chart.steps[2].x + chart.steps[2].w <= chart.steps[1].x + chart.steps[1].w  # the down bar goes left
    assert chart.ticks and all(chart.plot_left <= x <= chart.plot_right for x, _ in chart.ticks)
    exact = charts.waterfall(0.0, [{"feature": "a", "label": "A", "value": None, "contribution": 1.0}], 1.0)
    assert [s.kind for s in exact.steps] == ["base", "up", "total"] and exact.steps[1].value == "missing"


# ------------------------------------------------------------------------------------- pages over HTTP


def _finance_case(server: Server) -> dict:
    """Four agency-A transfers from one account to four others; the second gets a confirmed outcome via the API."""
    items = _events(server, "finance", 4, start=200)
    source = items[0]["source_account"]
    for i, item in enumerate(items):
        item["source_account"] = source
        item["target_account"] = f"CP{time.time_ns()}-{i}"
    r = _score(server, "finance", items)
    assert r.status_code == 200, r.text
    scored = r.json()["items"]
    with server.client() as c:
        prior = c.post("/outcomes", json={"score_id": scored[1]["score_id"], "outcome": "confirmed",
                                          "note": "prior case"}, headers=server.headers("reviewer"))
        assert prior.status_code == 201, prior.text
        detail = c.get(f"/scores/{scored[0]['score_id']}", headers=server.headers("reviewer")).json()
    return {"items": items, "scored": scored, "source": source, "detail": detail}


def _login(c: httpx.Client, key: str) -> httpx.Response:
    form = c.get("/review/login")
    token = re.search(r'name="login_csrf" value="([^"]+)"', form.text).group(1)
    return c.post("/review/login", data={"api_key": key, "login_csrf": token, "next": "/review/queue"})


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


@server_test
def test_pages_need_a_reviewer_session_and_csrf(server: Server):
    case = _finance_case(server)
    sid = case["scored"][0]["score_id"]
    with server.client() as c:
        first = c.get(f"/review/items/{sid}")
        assert first.status_code == 303 and first.headers["location"].startswith("/review/login?next=")
        assert _login(c, "rsk_wrong").status_code == 401
        refused = _login(c, server.keys[("customs", "A")])
        assert refused.status_code == 403 and "reviewer" in refused.text
        key = server.keys[("reviewer", "A")]
        ok = _login(c, key)
        assert ok.status_code == 303 and ok.headers["location"] == "/review/queue"
        cookie = next(v for k, v in ok.headers.multi_items() if k == "set-cookie" and "riskscore_review=" in v)
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert "Path=/review" in cookie and key not in cookie and key not in ok.headers["location"]
        page = c.get(f"/review/items/{sid}")
        assert page.status_code == 200 and key not in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        assert "<svg" in page.text and "script" not in page.text.lower()
        url = f"/review/items/{sid}/outcome"
        no_token = c.post(url, data={"outcome": "cleared"})
        assert no_token.status_code == 403
        foreign = c.post(url, data={"outcome": "cleared", "csrf": _csrf(page.text)},
                         headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403
        bad = c.post(url, data={"outcome": "maybe", "csrf": _csrf(page.text)})
        assert bad.status_code == 422 and "outcome" in bad.text
        assert c.get(f"/scores/{sid}", headers=server.headers("reviewer")).json()["outcome"] is None
        decided = c.get(f"/review/items/{case['scored'][1]['score_id']}")
        assert "prior case" in decided.text and "outcome-form" not in decided.text
        out = c.post("/review/logout", data={"csrf": _csrf(page.text)})
        assert out.status_code == 303
        assert c.get(f"/review/items/{sid}").status_code == 303
    with server.client() as other:
        assert _login(other, server.keys[("reviewer", "B")]).status_code == 303
        assert other.get(f"/review/items/{sid}").status_code == 404
        queue = other.get("/review/queue", params={"band": "any", "status": "any"})
        assert queue.status_code == 200 and sid not in queue.text
    with server.client() as admin:
        assert _login(admin, server.keys[("admin", "A")]).status_code == 303
        seen = admin.get(f"/review/items/{sid}")
        assert seen.status_code == 200 and "outcome-form" not in seen.text
        refused = admin.post(f"/review/items/{sid}/outcome", data={"outcome": "cleared", "csrf": _csrf(seen.text)})
        assert refused.status_code == 403


@server_test
def test_queue_bounds_and_a_late_second_decision(server: Server):
    """Absurd page numbers and dates are answered (never a 500), a page past the end goes to the last one, an
    expired session's outcome form returns to its item after login, and a second reviewer deciding an item already
    decided is told so (their note shown, not lost)."""
    case = _finance_case(server)
    sid = case["scored"][2]["score_id"]
    with server.client() as c, server.client() as late:
        expired = c.post(f"/review/items/{sid}/outcome", data={"outcome": "cleared"})
        assert expired.status_code == 303
        assert expired.headers["location"] == "/review/login?" + urlencode({"next": f"/review/items/{sid}"})
        assert _login(c, server.keys[("reviewer", "A")]).status_code == 303
        for page in ("99999999999999999999", "100000"):
            far = c.get("/review/queue", params={"band": "any", "status": "any", "page": page})
            assert far.status_code == 303 and "page=" in far.headers["location"], (page, far.text[:300])
            last = c.get(far.headers["location"])
            assert last.status_code == 200 and "Nothing matches" not in last.text
        for day in ("9999-12-31", "0001-01-01"):
            bad = c.get("/review/queue", params={"until": day, "since": day})
            assert bad.status_code == 400 and "between" in bad.text
        assert _login(late, server.keys[("reviewer", "A")]).status_code == 303
        page_a, page_b = c.get(f"/review/items/{sid}"), late.get(f"/review/items/{sid}")
        first = c.post(f"/review/items/{sid}/outcome", data={"outcome": "cleared", "csrf": _csrf(page_a.text)})
        assert first.status_code == 303
        second = late.post(f"/review/items/{sid}/outcome",
                           data={"outcome": "confirmed", "note": "my reasoning", "csrf": _csrf(page_b.text)})
        assert second.status_code == 409
        assert "already has an outcome" in second.text and "my reasoning" in second.text


# ------------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of a chromium Playwright can drive, or skip (fail under CI) with the reason."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[dev]')"
    if problem is None and not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        problem = f"chromium not found at {CHROMIUM} (apt-get install -y chromium, or set RISKSCORE_CHROMIUM)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"{problem}; CI must run the browser test")
        pytest.skip(problem)
    return CHROMIUM


@server_test
def test_reviewer_flow_in_the_browser(chromium: str, server: Server):
    from playwright.sync_api import expect, sync_playwright

    case = _finance_case(server)
    sid, detail = case["scored"][0]["score_id"], case["detail"]
    key = server.keys[("reviewer", "A")]
    urls: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(base_url=server.url, viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.on("request", lambda req: urls.append(req.url))
            page.goto("/review/")
            expect(page).to_have_url(re.compile(r"/review/login"))
            page.fill("#api_key", key)
            page.click("button[type=submit]")
            expect(page).to_have_url(re.compile(r"/review/queue"))
            expect(page.locator("h1")).to_have_text("Review queue")

            cookie = next(c for c in context.cookies() if c["name"] == "riskscore_review")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and key not in cookie["value"]

            page.select_option("select[name=domain]", "finance")
            page.select_option("select[name=band]", "any")
            page.select_option("select[name=status]", "open")
            page.select_option("select[name=sort]", "newest")
            page.click("form.filters button[type=submit]")
            row = page.locator(f'tr[data-score-id="{sid}"]')
            expect(row).to_be_visible()
            expect(page.locator('tr[data-score-id="' + case["scored"][1]["score_id"] + '"]')).to_have_count(0)
            row.locator("a").click()
            expect(page).to_have_url(re.compile(f"/review/items/{sid}$"))

            # score, band, threshold, model
            expect(page.locator(".summary .score")).to_have_text(f"{detail['score']:.3f}")
            expect(page.locator(".summary .band")).to_have_text(detail["band"])
            expect(page.locator(".summary .model")).to_have_text(
                f"{detail['model']['name']} v{detail['model']['version']}")
            expect(page.locator(".summary")).to_contain_text(f"{detail['threshold']:.3f}")

            # the explanation: chart bars and reason rows match the API's reasons
            chart = page.locator("svg.waterfall")
            expect(chart).to_be_visible()
            reasons = detail["reasons"]
            assert reasons
            expect(chart.locator("g.step-up rect, g.step-down rect")).to_have_count(len(reasons))
            expect(chart.locator("g.step-total .amount")).to_have_text(f"{detail['raw_margin']:.2f}")
            expect(chart.locator("g.step-base .amount")).to_have_text(f"{detail['base_value']:.2f}")
            box = chart.bounding_box()
            assert box and box["width"] > 400 and box["height"] > 100
            rows = page.locator("tr.reason-row")
            expect(rows).to_have_count(len(reasons))
            for i, reason in enumerate(reasons):
                expect(rows.nth(i)).to_contain_text(reason["label"])
                expect(rows.nth(i)).to_contain_text(f"{reason['contribution']:+.3f}")
                up_or_down = chart.locator("g.step-up, g.step-down").nth(i)
                expect(up_or_down.locator("text.label")).to_contain_text(reason["label"][:20])

            # finance: the sender's recent counterparties, with the prior confirmed case
            sender = page.locator(f'section.counterparties[data-account="{case["source"]}"]')
            expect(sender).to_be_visible()
            for item in case["items"][1:]:
                expect(sender.locator(f'tr.counterparty[data-account="{item["target_account"]}"]')).to_have_count(1)
            prior = sender.locator(f'tr.counterparty[data-account="{case["items"][1]["target_account"]}"]')
            expect(prior).to_contain_text("1 confirmed")
            expect(sender.locator("p.cases")).to_contain_text("1")

            # record the outcome through the form
            page.check("input[name=outcome][value=confirmed]")
            page.fill("#note", "Structuring through fresh counterparties (browser test)")
            page.click("form.outcome-form button[type=submit]")
            expect(page.locator(".decision")).to_have_attribute("data-outcome", "confirmed")
            expect(page.locator(".decided-by")).to_have_text(auth.hash_key(key)[:12])
            expect(page.locator(".decided-at")).to_contain_text(dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))
            expect(page.locator("p.ok")).to_be_visible()
            expect(page.locator("form.outcome-form")).to_have_count(0)

            png = page.screenshot(full_page=True)
            for path in (SCREENSHOT, ARTIFACTS / "review-page.png"):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(png)

            # another agency's reviewer cannot see it
            other = browser.new_context(base_url=server.url)
            op = other.new_page()
            op.goto("/review/login")
            op.fill("#api_key", server.keys[("reviewer", "B")])
            op.click("button[type=submit]")
            expect(op).to_have_url(re.compile(r"/review/queue"))
            response = op.goto(f"/review/items/{sid}")
            assert response is not None and response.status == 404
            expect(op.locator("h1")).to_have_text("Not found")
            op.goto("/review/queue?band=any&status=any")
            expect(op.locator(f'tr[data-score-id="{sid}"]')).to_have_count(0)
            other.close()
            context.close()
        finally:
            browser.close()

    assert all(key not in u for u in urls), "the API key must never appear in a URL"
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # stored exactly like POST /outcomes: visible in the API and exported as cases for retraining
    with server.client() as c:
        shown = c.get(f"/scores/{sid}", headers=server.headers("reviewer")).json()
    assert shown["outcome"]["outcome"] == "confirmed"
    assert shown["outcome"]["note"] == "Structuring through fresh counterparties (browser test)"
    store = AuditStore(f"sqlite:///{server.home / 'audit.db'}")
    try:
        cases = store.export_cases("finance")
        mine = cases[cases["case_id"].str.startswith(sid)]
        assert sorted(mine["entity_id"]) == sorted([case["source"], case["items"][0]["target_account"]])
        assert set(mine["outcome"]) == {"confirmed"} and set(mine["source"]) == {"reviewer"}
        assert store.get_outcome(sid)["decided_by"] == auth.hash_key(key)[:12]
    finally:
        store.close()

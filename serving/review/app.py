"""The reviewer workspace: HTML pages mounted at ``/review`` of the scoring service (see ``serving.review``)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from serving import auth
from serving.audit import jsonable
from serving.domains import DOMAINS
from serving.models import RequestError
from serving.review import charts
from serving.review.sessions import COOKIE, LOGIN_COOKIE, Session, SessionStore, same_token

log = logging.getLogger("riskscore.serving.review")

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 25
MAX_PAGE = 1_000_000  # page numbers beyond this are treated as this (SQL offsets stay in range)
MIN_DAY, MAX_DAY = dt.date(1900, 1, 1), dt.date(9998, 12, 31)  # date filters; the end date + 1 day must exist
BANDS = ("flagged", "any", "high", "medium", "low")
STATUSES = ("open", "confirmed", "cleared", "any")
SORTS = ("newest", "risk")
MAX_ID = 64

CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                        trim_blocks=True, lstrip_blocks=True)
templates.filters["value"] = charts.format_value
templates.filters["pct"] = lambda x: f"{100 * float(x):.1f}%"
templates.filters["when"] = lambda x: (x.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(x, dt.datetime)
                                       else str(x or "").replace("T", " "))

app = FastAPI(title="riskscore review", docs_url=None, redoc_url=None, openapi_url=None)
app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
sessions = SessionStore(lambda: _service().audit)


def _default_service():
    from _bentoml_sdk.service import get_current_service

    try:
        return get_current_service()
    except Exception:  # not initialised yet
        return None


_service_provider: Callable[[], Any] = _default_service


def set_service_provider(provider: Callable[[], Any]) -> None:
    """Where the pages find the running ``RiskScore`` instance (keys, audit store, registry); for tests."""
    global _service_provider
    _service_provider = provider


# -------------------------------------------------------------------------------------------- plumbing


class PageError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class LoginRequired(Exception):
    pass


@app.middleware("http")
async def _security_headers(request: Request, call_next):
    static = request.url.path.startswith(f"{_base(request)}/static/")  # before routing moves root_path
    response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        if name == "cache-control" and static:
            response.headers[name] = "public, max-age=3600"
        else:
            response.headers.setdefault(name, value)
    return response


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _secure(request: Request) -> bool:
    return (request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "") == "https"
            or os.environ.get("RISKSCORE_REVIEW_SECURE_COOKIE", "") == "1")


def _service():
    svc = _service_provider()
    if svc is None or getattr(svc, "registry", None) is None:
        raise PageError(503, "the service is starting; try again in a moment", {"Retry-After": "5"})
    return svc


def _api_request(request: Request, method: str = "GET", path: str | None = None, body: bytes = b"", *,
                 key: str | None = None, session: Session | None = None) -> Request:
    """A request to the API's own handlers on behalf of a key typed at login or of a session's key (same auth,
    checks and logging)."""
    state = request.scope.setdefault("riskscore", {})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    if session is not None:
        state["session_key"] = (session.key_id, session.key_sha256)
    scope = {**request.scope, "method": method, "query_string": b"", "riskscore": state, "headers": headers}
    if path is not None:
        scope.update(path=path, raw_path=path.encode(), root_path="")
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def _authorize(request: Request, key: str | None = None, session: Session | None = None,
               permission: str = "scores:read") -> auth.Caller:
    """The caller of a key or a session through the service's own ``_authorize`` (roles, agency, rate limits,
    access log)."""
    return _service()._authorize(_api_request(request, key=key, session=session), permission)


def _current(request: Request) -> tuple[Session, auth.Caller]:
    """The logged-in session and its (re-checked) caller, or :class:`LoginRequired`."""
    session = sessions.get(request.cookies.get(COOKIE))
    if session is None:
        raise LoginRequired()
    try:
        caller = _authorize(request, session=session)
    except auth.AuthError as err:
        if err.status == 401:  # the key was revoked
            sessions.drop(session.sid)
            raise LoginRequired() from None
        raise _auth_page_error(err) from None
    return session, caller


def _auth_page_error(err: auth.AuthError) -> PageError:
    retry = getattr(err, "retry_after", None)
    return PageError(err.status, str(err), {"Retry-After": str(retry)} if retry else None)


def _check_origin(request: Request) -> None:
    """Refuse cross-site form posts (on top of the SameSite=Strict cookie and the CSRF token).

    Browsers send ``Sec-Fetch-Site`` (pages cannot forge it); older ones an ``Origin`` that must be this host.
    """
    fetch_site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    hosts = {request.headers.get("host"), request.headers.get("x-forwarded-host")} - {None}
    if fetch_site is not None:
        ok = fetch_site in ("same-origin", "none")
    else:
        ok = origin is None or (origin != "null" and urlsplit(origin).netloc in hosts)
    if not ok or (origin not in (None, "null") and urlsplit(origin).netloc not in hosts):
        raise PageError(403, "cross-site form submission refused")


def render(request: Request, name: str, status_code: int = 200, session: Session | None = None,
           caller: auth.Caller | None = None, headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
    html = templates.get_template(name).render(
        base=_base(request), user=caller, csrf=session.csrf if session else None, **context)
    return HTMLResponse(html, status_code=status_code, headers=headers)


@app.exception_handler(PageError)
async def _page_error(request: Request, err: PageError) -> HTMLResponse:
    session, user = None, None
    try:  # the page's header shows who is logged in, when that can be known
        session = await run_in_threadpool(sessions.get, request.cookies.get(COOKIE))
        user = _service().keys.caller(session.key_id) if session is not None else None
    except Exception:  # e.g. the service is starting: the error page itself must still render
        session = None
    return render(request, "error.html", err.status, session, user, headers=err.headers, status=err.status,
                  message=err.message)


@app.exception_handler(LoginRequired)
async def _login_required(request: Request, _err: LoginRequired) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":  # e.g. an outcome form posted after the session ended: back to its page
        target = request.url.path.removesuffix("/outcome")
    return RedirectResponse(f"{_base(request)}/login?{urlencode({'next': target})}", status_code=303)


def _safe_next(request: Request, target: str | None) -> str:
    base = _base(request)
    if target and target.startswith(f"{base}/") and not target.startswith("//") and "\\" not in target \
            and not urlsplit(target).netloc and not target.startswith(f"{base}/login"):
        return target
    return f"{base}/queue"


# ----------------------------------------------------------------------------------------------- pages


@app.get("/")
async def index(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{_base(request)}/queue", status_code=303)


def _login_page(request: Request, status: int = 200, error: str | None = None, target: str = "") -> HTMLResponse:
    token = request.cookies.get(LOGIN_COOKIE) or os.urandom(24).hex()
    response = render(request, "login.html", status, login_csrf=token, error=error,
                      next=_safe_next(request, target or request.query_params.get("next")))
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=_secure(request),
                        path=_base(request) or "/")
    return response


@app.get("/login")
async def login_form(request: Request) -> HTMLResponse:
    return _login_page(request)


@app.post("/login")
async def login(request: Request) -> Response:
    _check_origin(request)
    form = await request.form()
    target = str(form.get("next") or "")
    if not same_token(request.cookies.get(LOGIN_COOKIE), str(form.get("login_csrf") or "")):
        return _login_page(request, 403, "The login form expired; please try again.", target)
    key = str(form.get("api_key") or "").strip()
    try:
        caller = await run_in_threadpool(_authorize, request, key)
    except auth.AuthError as err:
        if err.status == 403:
            message = f"A '{_role_of(key)}' key cannot open the review workspace; use a reviewer (or admin) key."
        elif err.status == 401:
            message = "That API key is not valid."
        else:
            message = str(err)
        return _login_page(request, err.status, message, target)
    await run_in_threadpool(sessions.drop, request.cookies.get(COOKIE))  # no session fixation: always a fresh id
    session = await run_in_threadpool(sessions.create, caller.key_id, auth.hash_key(key))
    log.info("review login", extra={"fields": {"key_id": caller.key_id, "role": caller.role,
                                               "agency": caller.agency}})
    response = RedirectResponse(_safe_next(request, target), status_code=303)
    response.set_cookie(COOKIE, session.sid, httponly=True, samesite="strict", secure=_secure(request),
                        path=_base(request) or "/")
    response.delete_cookie(LOGIN_COOKIE, path=_base(request) or "/")
    return response


def _role_of(key: str) -> str:
    try:
        return _service().keys.authenticate(key).role
    except Exception:
        return "this"


@app.post("/logout")
async def logout(request: Request) -> RedirectResponse:
    _check_origin(request)
    session = await run_in_threadpool(sessions.get, request.cookies.get(COOKIE))
    form = await request.form()
    if session is not None:
        if not same_token(session.csrf, str(form.get("csrf") or "")):
            raise PageError(403, "invalid or missing form token; reload the page and try again")
        await run_in_threadpool(sessions.drop, session.sid)
    response = RedirectResponse(f"{_base(request)}/login", status_code=303)
    response.delete_cookie(COOKIE, path=_base(request) or "/")
    return response


def _parse_day(value: str | None, field: str, errors: list[str]) -> dt.date | None:
    if not value:
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        day = None
    if day is None or not MIN_DAY <= day <= MAX_DAY:
        errors.append(f"{field}: expected a date like 2024-05-31, between {MIN_DAY} and {MAX_DAY}")
        return None
    return day


def _choice(value: str | None, allowed: tuple[str, ...], default: str, field: str, errors: list[str]) -> str:
    if value in (None, ""):
        return default
    if value not in allowed:
        errors.append(f"{field}: use one of {', '.join(allowed)}")
        return default
    return value


@app.get("/queue")
async def queue(request: Request) -> Response:
    session, caller = await run_in_threadpool(_current, request)  # session store and key checks: I/O
    q, errors = request.query_params, []
    domain = _choice(q.get("domain"), ("any", *DOMAINS), "any", "domain", errors)
    band = _choice(q.get("band"), BANDS, "flagged", "band", errors)
    status = _choice(q.get("status"), STATUSES, "open", "status", errors)
    sort = _choice(q.get("sort"), SORTS, "newest", "sort", errors)
    since = _parse_day(q.get("since"), "from", errors)
    until = _parse_day(q.get("until"), "to", errors)
    try:
        page = min(max(1, int(q.get("page") or 1)), MAX_PAGE)
    except ValueError:
        page, _ = 1, errors.append("page: expected a number")
    filters = {"domain": domain, "band": band, "status": status, "sort": sort,
               "since": since.isoformat() if since else "", "until": until.isoformat() if until else ""}
    svc = _service()
    result = await run_in_threadpool(
        svc.audit.review_queue, agency=None if caller.role == "admin" else caller.agency,
        domain=None if domain == "any" else domain,
        band=band if band in ("high", "medium", "low") else None, flagged=True if band == "flagged" else None,
        status=None if status == "any" else status,
        since=dt.datetime.combine(since, dt.time()) if since else None,
        until=dt.datetime.combine(until + dt.timedelta(days=1), dt.time()) if until else None,
        order=sort, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    pages = max(1, -(-result.total // PAGE_SIZE))

    def link(p: int) -> str:
        return f"{_base(request)}/queue?" + urlencode({**filters, "page": p})

    if page > pages and not errors:  # past the end (items were decided meanwhile, or a hand-made link)
        return RedirectResponse(link(pages), status_code=303)

    return render(request, "queue.html", 400 if errors else 200, session, caller, rows=result.rows,
                  total=result.total, page=page, pages=pages, filters=filters, errors=errors,
                  prev_link=link(page - 1) if page > 1 else None,
                  next_link=link(page + 1) if page < pages else None,
                  domains=DOMAINS, bands=BANDS, statuses=STATUSES, sorts=SORTS)


def _feature_labels(svc, row: dict) -> dict[str, str]:
    """Human labels of every feature from the live champion of the item's domain (same model name only)."""
    try:
        scorer = svc.registry.get(row["domain"])
        if scorer.model_name == row["model_name"]:
            return dict(getattr(scorer.bundle, "feature_labels", {}) or {})
    except Exception:  # a domain not served here: raw feature names
        log.debug("no feature labels for %s", row["domain"], exc_info=True)
    return {}


def _visible_row(svc, caller: auth.Caller, score_id: str) -> dict:
    """The score row if the caller may see it (same rule as ``GET /scores/{id}``), else 404."""
    row = svc.audit.get_score(score_id) if len(score_id) <= MAX_ID else None
    if row is None or (caller.role != "admin" and row["agency"] != caller.agency):
        raise PageError(404, "This item does not exist or belongs to another agency.")
    return row


def _item_context(svc, caller: auth.Caller, score_id: str) -> dict[str, Any]:
    row = _visible_row(svc, caller, score_id)
    expl = row["explanation_json"]
    labels = _feature_labels(svc, row)
    features = row["features_json"] or {}
    contributions = expl.get("contributions") or {}
    chart = charts.waterfall(expl["base_value"], expl.get("reasons") or [], expl["raw_margin"],
                             n_features=len(contributions) or None, labels=labels)
    all_contrib = sorted(
        ({"feature": f, "label": labels.get(f, f), "value": features.get(f), "contribution": c}
         for f, c in contributions.items()), key=lambda x: -abs(x["contribution"]))
    context: dict[str, Any] = {
        "row": row, "item": jsonable(row["input_json"]), "reasons": expl.get("reasons") or [], "chart": chart,
        "contributions": all_contrib, "base_value": expl["base_value"], "raw_margin": expl["raw_margin"],
        "outcome": svc.audit.get_outcome(score_id), "accounts": [],
    }
    if row["domain"] == "finance":
        agency = None if caller.role == "admin" else row["agency"]
        tx = row["input_json"]
        accounts = []
        for role, col in (("Sender", "source_account"), ("Receiver", "target_account")):
            acct = tx.get(col)
            if acct:
                accounts.append({"role": role, "account": acct,
                                 "counterparties": svc.audit.counterparties(acct, agency=agency)})
        everyone = [a["account"] for a in accounts] + [p["account"] for a in accounts for p in a["counterparties"]]
        cases = svc.audit.account_cases(everyone, agency=agency)
        for a in accounts:
            a["cases"] = cases.get(a["account"])
            for p in a["counterparties"]:
                p["cases"] = cases.get(p["account"])
        context["accounts"] = accounts
    return context


@app.get("/items/{score_id}")
async def item(request: Request, score_id: str) -> HTMLResponse:
    session, caller = await run_in_threadpool(_current, request)  # session store and key checks: I/O
    context = await run_in_threadpool(_item_context, _service(), caller, score_id)
    recorded = request.query_params.get("recorded") == "1" and context["outcome"] is not None
    return render(request, "item.html", 200, session, caller, recorded=recorded, form_error=None, **context)


@app.post("/items/{score_id}/outcome")
async def record_outcome(request: Request, score_id: str) -> Response:
    """The outcome form: handed to the API's ``POST /outcomes`` handler (same validation, state update, case)."""
    _check_origin(request)
    session, caller = await run_in_threadpool(_current, request)  # session store and key checks: I/O
    form = await request.form()
    if not same_token(session.csrf, str(form.get("csrf") or "")):
        raise PageError(403, "invalid or missing form token; reload the page and try again")
    svc = _service()
    note = str(form.get("note") or "").strip() or None
    body = json.dumps({"score_id": score_id, "outcome": str(form.get("outcome") or ""), "note": note}).encode()
    error, status = None, 200
    try:
        await svc.post_outcome(_api_request(request, "POST", "/outcomes", body, session=session))
    except RequestError as err:
        status = err.status
        error = "; ".join(f"{d['loc']}: {d['msg']}" for d in err.detail) if err.detail else err.error
        if err.status == 409:
            error = "This item already has an outcome (outcomes are final)."
    except auth.AuthError as err:
        if err.status == 401:
            raise LoginRequired() from None
        status, error = err.status, ("Only reviewers record outcomes." if err.status == 403 else str(err))
    if error is None:
        log.info("review outcome", extra={"fields": {"key_id": caller.key_id, "score_id": score_id}})
        return RedirectResponse(f"{_base(request)}/items/{score_id}?recorded=1", status_code=303)
    if status == 404:
        raise PageError(404, "This item does not exist or belongs to another agency.")
    context = await run_in_threadpool(_item_context, svc, caller, score_id)
    return render(request, "item.html", status, session, caller, recorded=False, form_error=error,
                  form_note=note or "", **context)

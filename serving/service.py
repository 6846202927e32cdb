"""The BentoML service ``RiskScore``: ``bentoml serve serving.service:RiskScore``.

Routes live in a FastAPI app mounted on the service (path params, 401/403/404/409/413 statuses and
header access); BentoML supplies the server, ``/healthz``, ``/livez`` and ``/metrics`` (our
``riskscore_*`` counters and histograms appear there too). ``/readyz`` is answered by a small ASGI
middleware with the loaded models. Scoring is CPU work: requests of a few items run on the
event loop (no thread hand-off) when the scorer is free, larger batches in a worker thread.

| route | who | body -> reply |
|---|---|---|
| ``POST /score_shipments`` | customs | ``{"items": [Declaration...]}`` -> ``{request_id, domain, items}`` |
| ``POST /score_transactions`` | financial | ``{"items": [Transfer...]}`` -> same |
| ``GET /scores/{score_id}`` | reviewer (own agency), admin | stored score, inputs, features, all SHAP contributions |
| ``POST /outcomes`` | reviewer (own agency) | ``{"score_id", "outcome": confirmed/cleared, "note"}`` -> 201 |
| ``POST /admin/reload`` | admin | ``{"domains"?: [...], "force"?: bool}`` -> versions before/after |
| ``GET /readyz`` | anyone | ``{"status": "ready", "domains": {d: {"model": {...}}}}`` |

Every authenticated call spends a token of its key's rate limit (:class:`serving.auth.RateLimiter`; 429 with
``Retry-After``). A failed champion reload keeps the previous champion serving, logs the reason and shows it
in ``/readyz`` (``"status": "degraded"``, ``domains.<d>.reload_error``) until a reload of that domain succeeds.
Drift gauges (``riskscore_feature_psi``, ``riskscore_score_psi``, ``riskscore_drift_retrain_due``) compare the
latest ``$RISKSCORE_DRIFT_WINDOW`` audited items of each champion to its reference (calibration window); they are
refreshed when ``/metrics`` is scraped, at most every ``$RISKSCORE_DRIFT_INTERVAL_S`` seconds.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from typing import Any

import bentoml
import sqlalchemy.exc as sa_exc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import auth
from serving.audit import AuditStore, OutcomeExists, dumps_json_bytes, jsonable
from serving.domains import DOMAINS, domain_info
from serving.models import OutcomeIn, RequestError, max_body_bytes, parse_batch, parse_json, parse_model
from serving.review import app as review_app
from serving.scorer import BUSY, RequestMeta, ScorerRegistry, ServingConfigError, served_domains
from serving.usage import SharedUsage
from training.drift import drift_report, drift_summary

log = logging.getLogger("riskscore.serving")
access_log = logging.getLogger("riskscore.serving.access")

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")
DRAIN_CAP = 32 * 1024 * 1024  # read (and discard) at most this much of an oversized body before answering 413


def inline_items() -> int:
    """Requests of at most this many items ($RISKSCORE_INLINE_ITEMS, default 8) are scored on the event loop
    when the domain's scorer is free: a single item takes a few milliseconds, less than handing it to a
    worker thread and back (GIL hand-offs). Larger batches run in a worker thread so the server keeps answering."""
    return int(os.environ.get("RISKSCORE_INLINE_ITEMS", "8"))


class FastJSONResponse(JSONResponse):
    """JSON response encoded by orjson (a 1000-item reply holds tens of thousands of values)."""

    def render(self, content: Any) -> bytes:
        return dumps_json_bytes(content)


app = FastAPI(title="riskscore", version="1", docs_url=None, redoc_url=None, openapi_url=None)
app.mount("/review", review_app)  # reviewer workspace (HTML pages), see serving/review


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields passed as ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging() -> None:
    """JSON lines on stderr for every ``riskscore`` logger (idempotent)."""
    root = logging.getLogger("riskscore")
    if any(getattr(h, "_riskscore", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._riskscore = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


_VS_REFERENCE = "recent items of the champion vs its reference (calibration) window; NaN until it has enough"


@functools.cache
def metrics() -> dict[str, Any]:
    """Prometheus metrics, created in the worker (after BentoML set up multiprocess mode)."""
    import prometheus_client as prom

    return {
        "scores": prom.Counter("riskscore_scores_total", "Scored items", ["domain", "band"]),
        "flagged": prom.Counter("riskscore_flagged_total", "Scored items at or above the threshold", ["domain"]),
        "score": prom.Histogram("riskscore_score", "Calibrated scores", ["domain"],
                                buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)),
        "requests": prom.Counter("riskscore_requests_total", "Requests", ["route", "status"]),
        "latency": prom.Histogram("riskscore_request_seconds", "Request latency", ["route"],
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
        "batch": prom.Histogram("riskscore_batch_items", "Items per scoring request", ["domain"],
                                buckets=(1, 2, 5, 10, 50, 100, 500, 1000)),
        "reloads": prom.Counter("riskscore_reloads_total", "Champion swaps", ["domain"]),
        "reload_failures": prom.Counter("riskscore_reload_failures_total", "Failed champion reloads", ["domain"]),
        "feature_psi": prom.Gauge("riskscore_feature_psi", f"PSI of a feature: {_VS_REFERENCE}",
                                  ["domain", "feature"], multiprocess_mode="mostrecent"),
        "score_psi": prom.Gauge("riskscore_score_psi", f"PSI of the score: {_VS_REFERENCE}",
                                ["domain"], multiprocess_mode="mostrecent"),
        "drift_items": prom.Gauge("riskscore_drift_window_items", "Recent scored items the drift gauges use",
                                  ["domain"], multiprocess_mode="mostrecent"),
        "drift_retrain": prom.Gauge("riskscore_drift_retrain_due", "1 when drift says retraining is due",
                                    ["domain"], multiprocess_mode="mostrecent"),
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 past ``limit`` bytes (the rest is drained, up to a cap, so clients see it)."""
    chunks, size = [], 0
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
        if too_big:
            if size > DRAIN_CAP:
                break
            continue
        chunks.append(chunk)
    if too_big:
        raise RequestError(413, f"request body exceeds {limit} bytes; split the batch")
    return b"".join(chunks)


def _state(request: Request) -> dict[str, Any]:
    return request.scope.setdefault("riskscore", {})


def _error(status: int, body: dict[str, Any], request_id: str | None) -> JSONResponse:
    headers = {"X-Request-ID": request_id} if request_id else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({**body, "request_id": request_id}, status_code=status, headers=headers)


@app.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    response = _error(err.status, err.body(), _state(request).get("request_id"))
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(err.retry_after)
    return response


@app.exception_handler(sa_exc.OperationalError)
@app.exception_handler(sa_exc.InterfaceError)
async def _store_unavailable(request: Request, err: Exception) -> JSONResponse:
    """The audit store cannot be written or read (disk full, locked too long, connection lost): nothing of this
    request was recorded (its transaction rolled back), so the client may retry it."""
    rid = _state(request).get("request_id")
    log.error("audit store unavailable", exc_info=err, extra={"fields": {"request_id": rid}})
    response = _error(503, {"error": "the audit store is unavailable; retry later"}, rid)
    response.headers["Retry-After"] = "5"
    return response


@app.exception_handler(auth.AuthError)
async def _auth_error(request: Request, err: auth.AuthError) -> JSONResponse:
    response = _error(err.status, {"error": str(err)}, _state(request).get("request_id"))
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(err.retry_after)
    return response


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404), wrong methods (405): the same error body as every other error."""
    response = _error(err.status_code, {"error": str(err.detail)}, _state(request).get("request_id"))
    response.headers.update(err.headers or {})
    return response


@app.exception_handler(ServingConfigError)
async def _config_error(request: Request, err: ServingConfigError) -> JSONResponse:
    return _error(503, {"error": str(err)}, _state(request).get("request_id"))


@app.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    rid = _state(request).get("request_id")
    log.error("unhandled error", exc_info=err, extra={"fields": {"request_id": rid}})
    return _error(500, {"error": "internal error; the request id is in the server log"}, rid)


class AccessLogMiddleware:
    """Request id + one JSON log line and request metrics per request of the mounted app."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        started = time.perf_counter()
        state = scope.setdefault("riskscore", {})
        state["request_id"] = uuid.uuid4().hex
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-request-id" for name, _ in headers):  # error responses set it
                    headers.append((b"x-request-id", state["request_id"].encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.inner(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            fields = {"request_id": state["request_id"], "method": scope.get("method"), "route": route,
                      "status": status["code"], "latency_ms": round(elapsed * 1000, 2)}
            fields.update({k: v for k, v in state.items() if k in ("items", "domain", "key_id", "agency",
                                                                  "replayed", "client_request_id")})
            access_log.info("request", extra={"fields": fields})
            try:
                m = metrics()
                m["requests"].labels(route, str(status["code"])).inc()
                m["latency"].labels(route).observe(elapsed)
            except Exception:  # metrics must never fail a request
                log.debug("metrics update failed", exc_info=True)


app.add_middleware(AccessLogMiddleware)


class ReadyzMiddleware:
    """Answers ``GET /readyz`` (before BentoML's plain one) with the loaded models, 503 until loaded."""

    def __init__(self, inner, **_options):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/readyz":
            return await self.inner(scope, receive, send)
        service = _current()
        registry = getattr(service, "registry", None)
        if registry is None:
            response = JSONResponse({"status": "starting"}, status_code=503)
        else:
            domains = registry.status()
            errors = dict(getattr(service, "reload_errors", {}))
            for domain, error in errors.items():
                if domain in domains:
                    domains[domain] = {**domains[domain], "reload_error": error}
            response = JSONResponse({"status": "degraded" if errors else "ready", "domains": domains})
        await response(scope, receive, send)


class PlainErrorMiddleware:
    """BentoML's own router answers unknown paths and wrong methods in plain text, before the routes of this
    service see them: such answers get the service's JSON error body, with a request id, like every other error."""

    def __init__(self, inner, **_options):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        held: dict[str, Any] = {}

        async def send_wrapper(message):
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if headers.get(b"content-type", b"").startswith(b"text/plain"):
                    held.update(status=message["status"], allow=headers.get(b"allow"), body=b"")
                    return
            if message["type"] == "http.response.body" and held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                response = _error(held["status"], {"error": held["body"].decode(errors="replace").strip()},
                                  uuid.uuid4().hex)
                if held["allow"]:
                    response.headers["Allow"] = held["allow"].decode()
                return await response(scope, receive, send)
            await send(message)

        await self.inner(scope, receive, send_wrapper)


class DriftMiddleware:
    """Refreshes the drift gauges (at most every ``$RISKSCORE_DRIFT_INTERVAL_S``) before ``/metrics`` answers."""

    def __init__(self, inner, **_options):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") == "/metrics":
            service = _current()
            if getattr(service, "registry", None) is not None:
                try:
                    await run_in_threadpool(service.refresh_drift)
                except Exception:  # drift must never break the metrics endpoint
                    log.warning("drift refresh failed", exc_info=True)
        return await self.inner(scope, receive, send)


def stop_server() -> None:
    """Fail fast: ask the ``bentoml serve`` arbiter (our parent) to shut down instead of respawning us forever.

    Set ``RISKSCORE_FAIL_FAST=0`` to keep BentoML's respawn behaviour.
    """
    if os.environ.get("RISKSCORE_FAIL_FAST", "1") == "0":
        return
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        if any("bentoml" in part for part in parent.cmdline()):
            log.error("stopping the server: fix the error above and start it again")
            parent.send_signal(signal.SIGTERM)
    except Exception:  # best effort; BentoML will respawn the worker otherwise
        log.debug("could not stop the server", exc_info=True)


def service_workers() -> int:
    """Worker processes per replica ($RISKSCORE_WORKERS, default 1); each holds its own online state."""
    return max(1, int(os.environ.get("RISKSCORE_WORKERS", "1")))


def _current():
    from _bentoml_sdk.service import get_current_service

    try:
        return get_current_service()
    except Exception:  # not initialised yet
        return None


@bentoml.service(
    name="riskscore",
    workers=service_workers(),
    traffic={"timeout": 120},
    logging={"access": {"enabled": False}},  # our JSON access line replaces BentoML's plain-text one
)
@bentoml.asgi_app(app, path="/")
class RiskScore:
    """Risk scores with SHAP explanations for customs declarations and money transfers."""

    def __init__(self) -> None:
        setup_logging()
        self.domains = served_domains()
        self.keys = auth.load_keys()
        self.limiter = auth.RateLimiter()
        self.reload_errors: dict[str, dict[str, str]] = {}
        self._drift_at = 0.0
        self._drift_features: dict[str, set[str]] = {}  # feature PSI gauges set per domain
        self.audit = AuditStore(background_checkpoint=True)
        self.usage = SharedUsage(self.audit, self.limiter, lambda: self.keys)
        self.reload_seq = self.audit.last_reload_seq()  # earlier reloads are in what this worker loads now
        self._reload_checked_at = time.monotonic()
        self._reload_check = threading.Lock()  # one check at a time (the event loop and thread-pool routes)
        registry = ScorerRegistry(self.domains, self.audit, on_written=self.usage.written)
        try:
            registry.start()
        except ServingConfigError as err:
            log.error(str(err))
            stop_server()
            raise
        self.registry = registry
        metrics()
        log.info("riskscore service ready", extra={"fields": {"domains": self.registry.status(),
                                                              "keys": self.keys.source,
                                                              "audit": _safe_url(self.audit.url)}})

    def __is_ready__(self) -> bool:
        return getattr(self, "registry", None) is not None

    @bentoml.on_shutdown
    def close(self) -> None:
        """Stop the background catch-up and release the audit store's connections (SQLite checkpoints its WAL)."""
        self.registry.stop()
        self.audit.close()

    # -- helpers ---------------------------------------------------------------------------------------
    def _authorize(self, request: Request, permission: str, scoring: bool = False) -> auth.Caller:
        """The caller of ``request`` if its key has ``permission`` and is under its rate limit (shared by every
        worker and replica). An accepted request of another route than scoring is recorded in the audit store
        (``key_requests``); a scoring request is recorded by its score rows."""
        self._follow_reloads()
        state = _state(request)
        if (session_key := state.get("session_key")) is not None:  # (id, hash): a review page session's key
            caller = self.keys.authorize_session(*session_key, permission)
        else:
            caller = self.keys.authorize(auth.presented_key(request.headers), permission)
        state["key_id"], state["agency"] = caller.key_id, caller.agency
        self.usage.take(caller)  # after charging what this key did through other workers and replicas
        if not scoring:
            request_id = state.setdefault("request_id", uuid.uuid4().hex)
            self.usage.record(caller, request_id, request.scope.get("method", ""), request.scope.get("path", ""))
        return caller

    def _set_drift_gauges(self, m: dict, domain: str, report: Any) -> None:
        """PSI gauges of ``domain`` from ``report``; NaN for the score and for every feature it does not cover
        (none: not enough items of the champion yet), and retraining not due."""
        psi = {} if report is None else dict(zip(report["name"], report["psi"], strict=True))
        nan = float("nan")
        m["score_psi"].labels(domain).set(psi.pop("score", nan))
        shown = self._drift_features.setdefault(domain, set())
        for name in shown - set(psi):
            m["feature_psi"].labels(domain, name).set(nan)
        for name, value in psi.items():
            m["feature_psi"].labels(domain, name).set(value)
        shown.update(psi)
        if report is None:
            m["drift_retrain"].labels(domain).set(0.0)

    def refresh_drift(self, force: bool = False) -> dict[str, Any]:
        """Recompute the drift gauges of every domain from its latest audited items (throttled unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._drift_at < drift_interval():
            return {}
        self._drift_at = now
        m, out = metrics(), {}
        for domain in self.registry.domains:
            scorer = self.registry.get(domain)
            reference = getattr(scorer.bundle, "reference", None) or {}
            items, report = 0, None
            if reference.get("features"):
                feats, scores = self.audit.recent_features(domain, drift_window(),
                                                           model_version=scorer.model_version)
                items = len(scores)
                if items >= max(drift_min_items(), 1):
                    report = drift_report(reference, feats, scores)
            m["drift_items"].labels(domain).set(items)
            self._set_drift_gauges(m, domain, report)
            if report is None:  # a new champion without enough items yet: no verdict (not the previous one's)
                continue
            summary = drift_summary(report, items=items)
            m["drift_retrain"].labels(domain).set(float(summary["retrain_due"]))
            out[domain] = summary
        return out

    async def _json(self, request: Request) -> Any:
        self._check_content_type(request)
        return parse_json(await read_body(request, max_body_bytes()))

    async def _score(self, domain: str, request: Request) -> JSONResponse:
        state = _state(request)
        state["domain"] = domain
        caller = self._authorize(request, domain_info(domain).permission, scoring=True)
        if client_rid := request.headers.get("x-request-id"):
            state["client_request_id"] = client_rid[:64]
        idem = request.headers.get("idempotency-key")
        if idem is not None and not IDEMPOTENCY_KEY.fullmatch(idem):
            raise RequestError(422, "invalid Idempotency-Key", [
                {"loc": "header.Idempotency-Key", "msg": "1 to 128 visible ASCII characters", "type": "value_error"}])
        self._check_content_type(request)
        body = await read_body(request, max_body_bytes())
        items = parse_batch(domain, parse_json(body))
        state["items"] = len(items)
        who = RequestMeta(key_id=caller.key_id, agency=caller.agency, request_id=state["request_id"],
                     idempotency_key=idem)

        def score(scorer):
            return scorer.score(items, who, body, self.audit)

        result = BUSY
        if len(items) <= inline_items():  # a few milliseconds: on the event loop, no thread hand-off
            result = self.registry.run(domain, score, blocking=False)
        if result is BUSY:  # larger batches (or the scorer is busy): in a worker thread
            result = await run_in_threadpool(self.registry.run, domain, score)
        headers = {}
        if result.replayed:
            state["replayed"] = True
            headers["Idempotent-Replayed"] = "true"
        else:
            m = metrics()
            m["batch"].labels(domain).observe(len(items))
            for item in result.response["items"]:
                m["scores"].labels(domain, item["band"]).inc()
                m["score"].labels(domain).observe(item["score"])
                if item["flagged"]:
                    m["flagged"].labels(domain).inc()
        return FastJSONResponse(result.response, headers=headers)

    @staticmethod
    def _check_content_type(request: Request) -> None:
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", "") and not ctype.endswith("+json"):
            raise RequestError(415, f"content type {ctype!r} is not supported; send application/json")

    # -- routes ----------------------------------------------------------------------------------------
    @app.post("/score_shipments")
    async def score_shipments(self, request: Request) -> JSONResponse:
        """Score customs declarations (role ``customs``)."""
        return await self._score("customs", request)

    @app.post("/score_transactions")
    async def score_transactions(self, request: Request) -> JSONResponse:
        """Score money transfers (role ``financial``)."""
        return await self._score("finance", request)

    @app.get("/scores/{score_id}")
    async def get_score(self, score_id: str, request: Request) -> JSONResponse:
        """A stored score with inputs, features and every SHAP contribution (reviewer: own agency; admin)."""
        caller = await run_in_threadpool(self._authorize, request, "scores:read")  # records the request
        row = await run_in_threadpool(self.audit.get_score, score_id) if len(score_id) <= 64 else None
        if row is None or (caller.role != "admin" and row["agency"] != caller.agency):
            raise RequestError(404, f"score {score_id[:64]!r} not found")
        expl = row["explanation_json"]
        outcome = None
        if row["outcome"] is not None:
            outcome = {"outcome": row["outcome"], "note": row["note"], "decided_at": jsonable(row["decided_at"])}
        return JSONResponse(jsonable({
            "score_id": row["score_id"], "request_id": row["request_id"], "created_at": row["created_at"],
            "domain": row["domain"], "id": row["event_id"], "agency": row["agency"],
            "model": {"name": row["model_name"], "version": row["model_version"]},
            "score": row["score"], "band": row["band"], "flagged": row["flagged"], "threshold": row["threshold"],
            "base_value": expl["base_value"], "raw_margin": expl["raw_margin"], "reasons": expl["reasons"],
            "contributions": expl["contributions"], "input": row["input_json"], "features": row["features_json"],
            "outcome": outcome,
        }))

    @app.post("/outcomes", status_code=201)
    async def post_outcome(self, request: Request) -> JSONResponse:
        """Record a reviewer's decision on a score of their agency; it becomes a case for training and features."""
        caller = await run_in_threadpool(self._authorize, request, "outcomes:write")  # records the request
        body = parse_model(OutcomeIn, await self._json(request))
        row = await run_in_threadpool(self.audit.get_score, body.score_id)
        if row is None or row["agency"] != caller.agency:
            raise RequestError(404, f"score {body.score_id!r} not found")

        def record() -> dict:
            if row["domain"] in self.registry.domains:
                return self.registry.run(row["domain"], lambda scorer: scorer.record_outcome(
                    self.audit, row, body.outcome, body.note, caller.key_id, caller.agency))
            return self.audit.record_outcome(body.score_id, body.outcome, body.note, caller.key_id, caller.agency)

        try:
            stored = await run_in_threadpool(record)
        except OutcomeExists as err:
            raise RequestError(409, str(err)) from None
        return JSONResponse(jsonable({k: stored[k] for k in ("score_id", "outcome", "note", "decided_at")}
                                     | {"decided_by": caller.key_id}), status_code=201)

    @app.post("/admin/reload")
    async def admin_reload(self, request: Request) -> JSONResponse:
        """Reload API keys and swap in each domain's current champion (admin); the other workers and replicas on
        this audit store follow (:meth:`_follow_reloads`)."""
        caller = await run_in_threadpool(self._authorize, request, "admin")  # records the request
        raw = await read_body(request, max_body_bytes())
        payload = parse_json(raw) if raw.strip() else {}
        if not isinstance(payload, dict) or set(payload) - {"domains", "force"}:
            raise RequestError(422, "body must be {\"domains\": [...], \"force\": false} or empty")
        domains = payload.get("domains")  # absent or null: every domain
        if domains is not None and (not isinstance(domains, list) or not domains
                                    or any(not isinstance(d, str) or d not in DOMAINS for d in domains)):
            raise RequestError(422, "request failed validation", [
                {"loc": "domains", "msg": f"a non-empty list of {', '.join(DOMAINS)}", "type": "value_error"}])
        if not isinstance(payload.get("force", False), bool):
            raise RequestError(422, "request failed validation", [
                {"loc": "force", "msg": "must be true or false", "type": "bool_type"}])
        try:
            keys = await run_in_threadpool(auth.load_keys)
        except ValueError as err:
            raise RequestError(409, f"reload failed; the current keys and models keep serving: {err}") from None
        force = bool(payload.get("force"))
        result, failed = await run_in_threadpool(self._reload, domains or self.registry.domains, force)
        seq = await run_in_threadpool(self.audit.request_reload, domains, force, caller.key_id)
        with self._reload_check:
            if seq == self.reload_seq + 1:  # ours is the only new one: no need to follow it here
                self.reload_seq = seq
        self.keys = keys  # revocations apply even when a champion failed to load
        if failed:
            raise RequestError(409, "reload failed; the current models keep serving: " + "; ".join(
                f"{d}: {e}" for d, e in failed.items()), [
                {"loc": f"domains.{d}", "msg": e, "type": "reload_failed"} for d, e in failed.items()])
        return JSONResponse({"domains": result, "ready": self.registry.status()})

    def _reload(self, domains: list[str], force: bool) -> tuple[dict[str, Any], dict[str, str]]:
        """Swap in each domain's current champion, one at a time (a broken one does not block the others):
        ``(results, failures)`` by domain; a failure keeps the previous champion and shows in ``/readyz``."""
        result, failed = {}, {}
        for domain in domains:
            try:
                result.update(self.registry.reload([domain], force))
                self.reload_errors.pop(domain, None)
            except Exception as err:  # whatever broke (registry, artifact, schema): keep the old one
                failed[domain] = str(getattr(err, "error", err))
                self.reload_errors[domain] = {"error": failed[domain], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime())}
                metrics()["reload_failures"].labels(domain).inc()
                log.error("domain %s: reload failed; the previous champion keeps serving: %s", domain,
                          failed[domain], extra={"fields": {"domain": domain}})
        for domain, change in result.items():
            if change.get("changed"):
                metrics()["reloads"].labels(domain).inc()
        return result, failed

    def _follow_reloads(self) -> None:
        """Follow ``POST /admin/reload`` requests that another worker or replica on this audit store answered.

        Checked at most every ``$RISKSCORE_RELOAD_CHECK_S`` seconds (default 1) before authorising a request;
        new ones swap in the key file at once (revocations apply within about that interval) and reload the
        champions in a background thread, as the admin route does.
        """
        if time.monotonic() - self._reload_checked_at < reload_check_interval():
            return
        if not self._reload_check.acquire(blocking=False):  # another request is checking right now
            return
        try:
            self._reload_checked_at = time.monotonic()
            try:
                pending = self.audit.reloads_after(self.reload_seq)
            except Exception:  # the store is unreachable: scoring will say so; other routes go on
                log.warning("could not check for reloads requested elsewhere", exc_info=True)
                return
            if not pending:
                return
            self.reload_seq = pending[-1].seq
        finally:
            self._reload_check.release()
        served = self.registry.domains
        if any(row.domains is None for row in pending):
            domains = list(served)
        else:
            domains = [d for d in served if any(d in row.domains for row in pending)]
        force = any(row.force for row in pending)
        try:
            self.keys = auth.load_keys()
        except ValueError:
            log.exception("a reload requested elsewhere could not read the keys; the current keys keep serving")
        log.info("following reload %s requested elsewhere (domains %s, force %s)", pending[-1].seq, domains, force)
        threading.Thread(target=self._reload_followed, args=(domains, force), name="riskscore-reload",
                         daemon=True).start()

    def _reload_followed(self, domains: list[str], force: bool) -> None:
        try:
            self._reload(domains, force)
        except Exception:  # logged; the current champions keep serving
            log.exception("a reload requested elsewhere failed")


RiskScore.add_asgi_middleware(ReadyzMiddleware)
RiskScore.add_asgi_middleware(DriftMiddleware)
RiskScore.add_asgi_middleware(PlainErrorMiddleware)


def drift_interval() -> float:
    """Seconds between drift-gauge refreshes: $RISKSCORE_DRIFT_INTERVAL_S (default 30)."""
    return float(os.environ.get("RISKSCORE_DRIFT_INTERVAL_S", "30"))


def reload_check_interval() -> float:
    """Seconds between checks for reloads requested through another worker or replica:
    $RISKSCORE_RELOAD_CHECK_S (default 1)."""
    return float(os.environ.get("RISKSCORE_RELOAD_CHECK_S", "1"))


def drift_window() -> int:
    """Latest audited items per domain the drift gauges use: $RISKSCORE_DRIFT_WINDOW (default 5000)."""
    return int(os.environ.get("RISKSCORE_DRIFT_WINDOW", "5000"))


def drift_min_items() -> int:
    """Fewer recent items than this ($RISKSCORE_DRIFT_MIN_ITEMS, default 20) leave the PSI gauges unset."""
    return int(os.environ.get("RISKSCORE_DRIFT_MIN_ITEMS", "20"))


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


__all__ = ["RiskScore", "app"]

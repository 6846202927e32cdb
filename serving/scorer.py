"""Per-domain scorers: champion bundle + online feature state, scoring with audit, atomic reload.

A :class:`DomainScorer` owns one champion bundle and the online feature state of its domain, seeded
from the data the bundle was trained and tested on (``$RISKSCORE_HISTORY_<DOMAIN>`` overrides the paths;
``none`` = start empty) and the domain's scored events and outcomes replayed from the audit store.

Scoring a batch: items in contract dtypes -> processed in time order, each distinct time's items get
their features from the state and are then ingested (so a later item of the batch sees an earlier one,
exactly as in training) -> ``bundle.explain`` -> one audit transaction -> response. An event id the state holds
already (in the history, or scored before) is scored again but counts once in the state, as in training and as
after a restart, which replays the first scoring of each id.

:class:`ScorerRegistry` builds a new scorer fully before swapping it in; requests already holding the
old scorer's lock finish on it, waiting ones move to the new one, and the new state catches up on
whatever the old one scored meanwhile, so no scored event is lost from the history.

Several workers (``$RISKSCORE_WORKERS``) and several replicas share one audit store, and each holds its own
state: before scoring, a scorer catches up with what the others recorded since it last looked
(:meth:`DomainScorer.catch_up`; ``$RISKSCORE_SYNC_S``), so an item's features count every event committed to
the audit store before its request, whichever process scored it. Idle scorers catch up in the background
(``$RISKSCORE_IDLE_SYNC_S``), so a request after a quiet spell does not carry the backlog.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from features.domains import events_of
from features.domains import feature_set as domain_feature_set
from features.featureset import OnlineFeatures
from riskscore import config
from serving.audit import (
    AuditStore,
    IdempotencyConflict,
    Replay,
    SeqCursor,
    events_frame,
    first_per_event,
    jsonable,
    utcnow,
)
from serving.domains import domain_info
from serving.fast_path import DEFAULT_TOP_N, explain, feature_columns_in_time_order, feature_records, ingest_columns
from serving.models import RequestError, item_columns, stored_item_columns

log = logging.getLogger("riskscore.serving.scorer")


class ServingConfigError(RuntimeError):
    """The service cannot start or reload (no champion, unreadable history...)."""


def served_domains() -> list[str]:
    """Domains to serve: $RISKSCORE_DOMAINS (comma-separated), default customs and finance."""
    raw = os.environ.get("RISKSCORE_DOMAINS", ",".join(config.DOMAINS))
    domains = [d.strip() for d in raw.split(",") if d.strip()]
    unknown = [d for d in domains if d not in config.DOMAINS]
    if unknown or not domains:
        raise ServingConfigError(f"RISKSCORE_DOMAINS={raw!r}: use a comma-separated subset of {config.DOMAINS}")
    return domains


def sync_interval() -> float:
    """Seconds between a scorer's catch-ups with the audit store ($RISKSCORE_SYNC_S, default 0: before every
    scoring request, one indexed read that returns nothing when no other process wrote)."""
    raw = os.environ.get("RISKSCORE_SYNC_S", "0")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ServingConfigError(f"RISKSCORE_SYNC_S={raw!r}: use 0 (every request) or a number of seconds")
    return value


def idle_sync_interval() -> float:
    """Seconds after which an idle scorer catches up in the background ($RISKSCORE_IDLE_SYNC_S, default 1; 0 = never),
    so a worker or replica that got no requests for a while does not ingest the whole backlog inside its next one."""
    try:
        return max(0.0, float(os.environ.get("RISKSCORE_IDLE_SYNC_S", "1")))
    except ValueError:
        raise ServingConfigError("RISKSCORE_IDLE_SYNC_S: use a number of seconds (0 = never)") from None


CATCH_UP_FRAME_ROWS = 256  # catch-ups of more events than this go through pandas (bulk loads win there)


def top_n() -> int:
    return int(os.environ.get("RISKSCORE_TOP_REASONS", DEFAULT_TOP_N))


@dataclass
class RequestMeta:
    """Who asked (key id and agency from :mod:`serving.auth`), the request id and the optional Idempotency-Key."""

    key_id: str
    agency: str
    request_id: str
    idempotency_key: str | None = None


@dataclass
class ScoreResult:
    response: dict[str, Any]
    replayed: bool = False  # the stored reply of an earlier request with the same Idempotency-Key


def _version_fields(domain: str, info: Any) -> tuple[str, str]:
    """(registered name, version) from whatever ``load_champion`` returns as version info."""
    def get(key: str):
        return info.get(key) if isinstance(info, dict) else getattr(info, key, None)

    name = get("name") or get("model_name") or config.model_name(domain)
    version = get("version") or get("model_version") or "unknown"
    return str(name), str(version)


def load_champion(domain: str):
    """``(bundle, name, version)`` of the domain's champion; a clear error naming the fix if there is none."""
    try:
        from training.registry import load_champion as registry_load
    except ImportError as err:
        raise ServingConfigError(f"training.registry is not available: {err}") from err
    try:
        bundle, info = registry_load(domain)
    except Exception as err:  # any registry failure: a config error
        train = f"train and promote one with: riskscore train --domain {domain}; "
        others = "or serve the other domains only (RISKSCORE_DOMAINS / riskscore serve --domains)"
        hint = ("" if "riskscore train" in str(err) else train) + others
        raise ServingConfigError(
            f"domain '{domain}' has no usable champion model (registered model '{config.model_name(domain)}', "
            f"alias 'champion', registry {_safe_uri(config.tracking_uri())}): {err}; {hint}"
        ) from err
    name, version = _version_fields(domain, info)
    return bundle, name, version


def _safe_uri(uri: str) -> str:
    """A tracking URI without credentials."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def history_paths(domain: str, bundle) -> list[Path]:
    """Where the domain's entity history comes from: $RISKSCORE_HISTORY_<DOMAIN> (paths separated by
    ``os.pathsep``) or the data the bundle was trained and tested on."""
    env = f"RISKSCORE_HISTORY_{domain.upper()}"
    raw = os.environ.get(env)
    if raw is not None and raw.strip().lower() in ("", "none"):
        return []
    paths = [p for p in raw.split(os.pathsep) if p.strip()] if raw else bundle.history_paths()
    if not paths:
        log.warning("domain %s: the champion records no training data path and %s is unset; "
                    "features start from an empty history", domain, env)
        return []
    for path in paths:
        if not Path(path).exists():
            raise ServingConfigError(
                f"domain '{domain}': entity history {path!r} (data the champion was trained on) is not here; "
                f"set {env} to the data path(s), or to 'none' to start with an empty history")
    return [Path(p) for p in paths]


def load_history(domain: str, paths: list[Path], label_delay_days: float | None = None,
                 ) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """Events (with labels) and cases of the history datasets (``features.datasets.load_datasets``); cases derived
    from labels close ``label_delay_days`` after opening (the model's delay, as in its training; ``None``: the
    domain default)."""
    if not paths:
        return None, None
    from features.datasets import load_datasets

    try:
        data = load_datasets(domain, paths, label_delay_days)
    except Exception as err:  # name the files, whatever broke
        names = ", ".join(str(p) for p in paths)
        raise ServingConfigError(f"domain '{domain}': cannot load entity history from {names}: {err}") from err
    return events_of(data), getattr(data, "cases", None)


def body_digest(domain: str, body: bytes) -> str:
    return hashlib.sha256(domain.encode() + b"\0" + body).hexdigest()


class DomainScorer:
    """Champion bundle + online feature state of one domain (see module docstring)."""

    def __init__(self, domain: str, bundle, model_name: str, model_version: str, online: OnlineFeatures):
        self.domain = domain
        self.info = domain_info(domain)
        self.bundle = bundle
        self.model_name = model_name
        self.model_version = model_version
        self.online = online
        self.fs = online.fs
        self.history_ids: set[str] = set()  # event ids of the data: their labels are the data's, not reviewers'
        self.seen_ids: set[str] = set()  # other event ids in the state: each counts once, whoever scores it again
        self.decided_ids: set[str] = set()  # event ids with a reviewer outcome in the state (the first one counts)
        self.lock = threading.RLock()
        self.retired = False
        self.stale = False  # the state may differ from the audit store: refuse requests until rebuilt
        self.rebuild_started: float | None = None
        self.score_cursor = SeqCursor()  # audit rows already in the state
        self.outcome_cursor = SeqCursor()
        self.on_written = None  # called with the seqs of the score rows this scorer wrote (ScorerRegistry)
        self.sync_every = sync_interval()
        self.synced_at = float("-inf")
        self.loaded_at = utcnow()

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def build(cls, domain: str, audit: AuditStore, champion: tuple | None = None) -> DomainScorer:
        """Load the champion (unless given), seed the history, replay the audit store."""
        started = time.perf_counter()
        bundle, name, version = champion or load_champion(domain)
        delay = getattr(bundle, "label_delay_days", None)
        fs = domain_feature_set(domain, delay)
        if getattr(bundle, "feature_set_version", fs.version) != fs.version:
            raise ServingConfigError(
                f"domain '{domain}': champion {name} v{version} was trained with feature set "
                f"{bundle.feature_set_version!r} but this code computes {fs.version!r}; retrain or deploy matching code"
            )
        if missing := [n for n in bundle.feature_names if n not in fs.names]:
            raise ServingConfigError(
                f"domain '{domain}': champion {name} v{version} needs features this code does not compute "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); retrain or deploy matching code")
        events, cases = load_history(domain, history_paths(domain, bundle), delay)
        online = fs.online(events, cases)
        scorer = cls(domain, bundle, name, version, online)
        if events is not None:
            scorer.history_ids = set(events[fs.id_col].astype(str))
        scorer.apply_replay(audit.replay(domain, scorer.score_cursor, scorer.outcome_cursor))
        log.info("domain %s: champion %s v%s ready with %d history events in %.1fs", domain, name, version,
                 online.events_seen, time.perf_counter() - started)
        return scorer

    def apply_replay(self, replay: Replay) -> None:
        """Ingest audited events not in the state yet (by id), outcome labels (dated by their decision) and cases
        into the state, and move the cursors past what the replay read. As in training, an event takes its first
        reviewer decision, and none if the data has the event (the data's label counts)."""
        rows = [r for r in replay.event_rows if not self.in_state(str(r.get(self.fs.id_col)))]
        self.seen_ids.update(str(r.get(self.fs.id_col)) for r in rows)
        if len(rows) > CATCH_UP_FRAME_ROWS:
            self.online.ingest(events_frame(self.domain, rows))
        elif rows:
            ingest_columns(self.online, stored_item_columns(self.domain, rows))
        decided = first_per_event(replay.decided, self.history_ids, self.decided_ids)  # as training reads them
        if decided:
            kept = dataclasses.replace(replay, decided=decided)
            self.online.ingest_labels(kept.labelled)  # known from max(event time + delay, decision time)
            self.online.ingest_cases(kept.cases)
        self.score_cursor.mark(replay.score_seqs)
        self.outcome_cursor.mark(replay.outcome_seqs)

    def in_state(self, event_id: str) -> bool:
        """Whether the state holds the event already (from the data or scored before)."""
        return event_id in self.history_ids or event_id in self.seen_ids

    def catch_up(self, audit: AuditStore) -> None:
        """Ingest what other workers and replicas recorded since the last read (caller holds ``self.lock``).

        One cheap query of both tables' highest seq first: with nothing new (one worker, one replica) that is all.
        """
        score_head, outcome_head = audit.heads()
        if self.score_cursor.behind(score_head) or self.outcome_cursor.behind(outcome_head):
            replay = audit.replay(self.domain, self.score_cursor, self.outcome_cursor)
            try:
                self.apply_replay(replay)
            except Exception:
                self.stale = True  # partly applied: rebuild rather than apply parts twice
                raise
        self.synced_at = time.monotonic()

    # -- scoring -----------------------------------------------------------------------------------------
    def score(self, items: list, caller: RequestMeta, body: bytes, audit: AuditStore) -> ScoreResult:
        """Score validated items (caller must hold ``self.lock``); see module docstring."""
        digest = body_digest(self.domain, body)
        if caller.idempotency_key:
            stored = audit.find_request(caller.key_id, caller.idempotency_key)
            if stored is not None:
                return self._replayed(stored, digest)
        if time.monotonic() - self.synced_at >= self.sync_every:
            self.catch_up(audit)
        try:  # from here the state holds the batch: any failure before the commit leaves it stale
            rows = [item.model_dump(mode="json") for item in items]
            ids = [str(row[self.info.id_col]) for row in rows]
            new = [not self.in_state(i) for i in ids]
            feats = feature_columns_in_time_order(self.online, item_columns(self.domain, items),
                                                  None if all(new) else new)
            self.seen_ids.update(ids)
            explanations = explain(self.bundle, feats, top_n=top_n())
            feature_rows = feature_records(feats, self.fs.names)
            created = utcnow()
            out_items, audit_rows = [], []
            for i, (row, expl) in enumerate(zip(rows, explanations, strict=True)):
                score_id = str(uuid.uuid4())
                reasons = [jsonable(vars(r)) for r in expl.reasons]
                shown = {r.feature for r in expl.reasons}
                other = sum(c for name, c in expl.contributions.items() if name not in shown)
                out_items.append({
                    "score_id": score_id, "id": row[self.info.id_col], "score": expl.score, "band": expl.band,
                    "flagged": bool(expl.flagged), "threshold": float(self.bundle.threshold), "reasons": reasons,
                    "other_contribution": other, "base_value": expl.base_value, "raw_margin": expl.raw_margin,
                    "model": {"name": self.model_name, "version": self.model_version},
                })
                audit_rows.append({
                    "score_id": score_id, "request_id": caller.request_id, "item_index": i, "created_at": created,
                    "domain": self.domain, "event_id": row[self.info.id_col], "caller_key_id": caller.key_id,
                    "agency": caller.agency, "model_name": self.model_name, "model_version": self.model_version,
                    "input_json": row, "features_json": feature_rows[i], "score": expl.score,
                    "band": expl.band, "flagged": bool(expl.flagged), "threshold": float(self.bundle.threshold),
                    "explanation_json": {"base_value": expl.base_value, "raw_margin": expl.raw_margin,
                                         "reasons": reasons, "contributions": expl.contributions},
                })
            response = {"request_id": caller.request_id, "domain": self.domain, "items": out_items}
            request_row = {"request_id": caller.request_id, "created_at": created, "domain": self.domain,
                           "caller_key_id": caller.key_id, "agency": caller.agency,
                           "idempotency_key": caller.idempotency_key, "body_sha256": digest, "items": len(items)}
            seqs = audit.record_scores(request_row, audit_rows, response)
        except IdempotencyConflict as conflict:  # pragma: no cover - only with several writers
            if conflict.stored is None or conflict.stored.body_sha256 != digest:
                self.stale = True  # same body: the other writer's rows are these events (skipped by id)
            if conflict.stored is not None:
                return self._replayed(conflict.stored, digest)
            raise
        except Exception:
            self.stale = True  # the state ingested events the audit store does not have: rebuild it
            raise
        self.score_cursor.written(seqs)  # in the state already: no catch-up reads them back
        if self.on_written is not None:
            self.on_written(self, seqs)
        return ScoreResult(response)

    def _replayed(self, stored, digest: str) -> ScoreResult:
        if stored.body_sha256 != digest:
            raise RequestError(422, "Idempotency-Key was already used with a different request body", [
                {"loc": "header.Idempotency-Key", "msg": "reused with a different request", "type": "conflict"}])
        return ScoreResult(stored.response, replayed=True)

    def record_outcome(self, audit: AuditStore, score_row: dict, outcome: str, note: str | None,
                       decided_by: str, agency: str) -> dict:
        """Store a reviewer outcome and feed it to the state as a label and cases (caller holds the lock)."""
        stored = audit.record_outcome(score_row["score_id"], outcome, note, decided_by, agency)
        try:
            self.catch_up(audit)
        except Exception:  # the outcome is stored (the client must not retry it): the next catch-up applies it
            log.warning("domain %s: outcome stored, catch-up failed", self.domain, exc_info=True)
        return stored

    def status(self) -> dict[str, Any]:
        return {"model": {"name": self.model_name, "version": self.model_version},
                "feature_set": self.fs.version, "history_events": self.online.events_seen,
                "loaded_at": self.loaded_at.isoformat() + "Z"}


BUSY = object()  # ScorerRegistry.run(blocking=False): the scorer is in use
REBUILD_RETRY_S = 5  # a stale scorer's failed rebuild is retried by the next request after this many seconds


def freeze_heap() -> None:
    """Keep the cyclic garbage collector away from the feature state (``gc.freeze``).

    The state holds millions of long-lived objects (keys, series), and it grows with every scored event. A full
    collection scans every tracked object that is not frozen, so it cost 100-200 ms (a p99 stall every few
    seconds under load) and grew with the history. Here everything alive now is frozen, and after every full
    collection the survivors are frozen too (what a full collection leaves is live), so each full collection
    scans only what was allocated since the previous one. Frozen objects are still freed by reference counting
    (a replaced state's objects too); only a reference cycle created before a freeze would outlive its use.
    """
    gc.collect()
    gc.freeze()
    if _freeze_after_full_collection not in gc.callbacks:
        gc.callbacks.append(_freeze_after_full_collection)


def _freeze_after_full_collection(phase: str, info: dict) -> None:
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


class ScorerRegistry:
    """The live scorer of each served domain; reload swaps a fully built replacement atomically."""

    def __init__(self, domains: list[str], audit: AuditStore, on_written: Callable[[list[int]], None] | None = None):
        self.domains = list(domains)
        self.audit = audit
        self.on_written = on_written  # told the seqs of every score row written here (serving.usage)
        self._scorers: dict[str, DomainScorer] = {}
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()

    def _written(self, writer: DomainScorer, seqs: list[int]) -> None:
        """A scorer wrote score rows: the other domains' scorers here have nothing to apply from them."""
        for scorer in self._scorers.values():
            if scorer is not writer:
                scorer.score_cursor.written(seqs)
        if self.on_written is not None:
            self.on_written(seqs)

    def _adopt(self, scorer: DomainScorer) -> DomainScorer:
        scorer.on_written = self._written
        return scorer

    def start(self) -> None:
        """Build every domain's scorer; one error listing every domain that cannot be served."""
        errors = []
        for domain in self.domains:
            try:
                self._scorers = {**self._scorers, domain: self._adopt(DomainScorer.build(domain, self.audit))}
            except ServingConfigError as err:
                errors.append(str(err))
        if errors:
            raise ServingConfigError("cannot start the scoring service:\n  " + "\n  ".join(errors))
        freeze_heap()
        if (every := idle_sync_interval()) > 0:
            threading.Thread(target=self._sync_idle, args=(every,), name="riskscore-idle-sync", daemon=True).start()

    def _sync_idle(self, every: float) -> None:
        """Catch up every scorer that has not synced for ``every`` seconds and is free (never waits for a request)."""
        while not self._stop.wait(every / 2):
            for scorer in list(self._scorers.values()):
                if time.monotonic() - scorer.synced_at < every or not scorer.lock.acquire(blocking=False):
                    continue
                try:
                    if not scorer.retired:
                        scorer.catch_up(self.audit)
                except Exception:  # logged; the next request catches up again
                    log.warning("domain %s: background catch-up failed", scorer.domain, exc_info=True)
                finally:
                    scorer.lock.release()

    def stop(self) -> None:
        """Stop the background catch-up."""
        self._stop.set()

    def get(self, domain: str) -> DomainScorer:
        scorer = self._scorers.get(domain)
        if scorer is None:
            raise RequestError(404, f"domain '{domain}' is not served here (RISKSCORE_DOMAINS)")
        return scorer

    def run(self, domain: str, fn, blocking: bool = True):
        """Call ``fn(scorer)`` holding the live scorer's lock (retried on the new one after a swap).

        ``blocking=False``: return :data:`BUSY` instead of waiting when another request holds the lock.
        """
        for _ in range(100):
            scorer = self.get(domain)
            if not scorer.lock.acquire(blocking=blocking):
                return BUSY
            try:
                if scorer.retired:
                    continue
                if scorer.stale:  # its state may count events the audit store lacks: never score from it
                    self._start_rebuild(domain, scorer)
                    raise RequestError(503, "the feature state is being rebuilt after an audit store failure; "
                                            "retry in a few seconds", retry_after=REBUILD_RETRY_S)
                try:
                    return fn(scorer)
                finally:
                    if scorer.stale:
                        self._start_rebuild(domain, scorer)
            finally:
                scorer.lock.release()
        raise RuntimeError(f"domain {domain}: scorer kept changing during the request")

    def _start_rebuild(self, domain: str, scorer: DomainScorer) -> None:
        """One rebuild of a stale scorer at a time, retried at most every :data:`REBUILD_RETRY_S` (caller holds
        its lock)."""
        now = time.monotonic()
        if scorer.rebuild_started is not None and now - scorer.rebuild_started < REBUILD_RETRY_S:
            return
        scorer.rebuild_started = now
        threading.Thread(target=self._rebuild_stale, args=(domain, scorer), daemon=True).start()

    def _rebuild_stale(self, domain: str, stale: DomainScorer) -> None:
        try:
            self.reload([domain], force=True, replacing=stale)
        except Exception:  # logged; requests get 503 until a later attempt succeeds
            log.exception("domain %s: rebuilding the feature state after an audit failure failed", domain)

    def reload(self, domains: list[str] | None = None, force: bool = False,
               replacing: DomainScorer | None = None) -> dict[str, Any]:
        """Load each domain's current champion; swap in a rebuilt scorer when the version changed (or ``force``).
        ``replacing``: a stale scorer's rebuild, only if that scorer is still the live one, and with its own model:
        a new champion is served only by a reload (an admin's, or one noticed by the version check), never by one
        worker that happened to fail an audit write."""
        result: dict[str, Any] = {}
        with self._reload_lock:
            for domain in domains or self.domains:
                old = self.get(domain)
                if replacing is not None and old is not replacing:
                    result[domain] = {"version": old.model_version, "changed": False}
                    continue
                champion = ((old.bundle, old.model_name, old.model_version) if replacing is not None
                            else load_champion(domain))
                if not force and not old.stale and champion[2] == old.model_version and champion[1] == old.model_name:
                    result[domain] = {"version": old.model_version, "changed": False}
                    continue
                new = self._adopt(DomainScorer.build(domain, self.audit, champion))
                with old.lock:  # brief: blocks scoring on the old state while the new one catches up
                    new.catch_up(self.audit)
                    self._scorers = {**self._scorers, domain: new}
                    old.retired = True
                log.info("domain %s: swapped champion %s v%s -> v%s", domain, new.model_name, old.model_version,
                         new.model_version)
                result[domain] = {"previous_version": old.model_version, "version": new.model_version,
                                  "changed": True}
            if any(r["changed"] for r in result.values()):
                freeze_heap()
        return result

    def status(self) -> dict[str, Any]:
        return {domain: scorer.status() for domain, scorer in self._scorers.items()}

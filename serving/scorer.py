"""Per-domain scorers: champion bundle + online feature state, scoring with audit, atomic reload.

A :class:`DomainScorer` owns one champion bundle and the online feature state of its domain, seeded
from the bundle's training data (``$RISKSCORE_HISTORY_<DOMAIN>`` overrides the path; ``none`` = start
empty) and the domain's scored events and outcomes replayed from the audit store.

Scoring a batch: items in contract dtypes -> processed in time order, each distinct time's items get
their features from the state and are then ingested (so a later item of the batch sees an earlier one,
exactly as in training) -> ``bundle.explain`` -> one audit transaction -> response.

:class:`ScorerRegistry` builds a new scorer fully before swapping it in; requests already holding the
old scorer's lock finish on it, waiting ones move to the new one, and the new state catches up on
whatever the old one scored meanwhile, so no scored event is lost from the history.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.domains import events_of
from features.domains import feature_set as domain_feature_set
from features.featureset import T_COL, OnlineFeatures
from riskscore import config
from serving.audit import AuditStore, IdempotencyConflict, Replay, events_frame, jsonable, utcnow
from serving.domains import domain_info
from serving.models import RequestError

log = logging.getLogger("riskscore.serving.scorer")

DEFAULT_TOP_N = 5


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


def history_path(domain: str, bundle) -> Path | None:
    """Where the domain's entity history comes from: $RISKSCORE_HISTORY_<DOMAIN> or ``bundle.data_path``."""
    env = f"RISKSCORE_HISTORY_{domain.upper()}"
    raw = os.environ.get(env)
    if raw is not None and raw.strip().lower() in ("", "none"):
        return None
    raw = raw or getattr(bundle, "data_path", "") or ""
    if not raw:
        log.warning("domain %s: the champion records no training data path and %s is unset; "
                    "features start from an empty history", domain, env)
        return None
    path = Path(raw)
    if not path.exists():
        raise ServingConfigError(
            f"domain '{domain}': entity history {raw!r} (the champion's training data) does not exist here; "
            f"set {env} to the data path, or to 'none' to start with an empty history")
    return path


def load_history(domain: str, path: Path | None) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """Events (with labels) and cases of the history dataset (``features.datasets.load_dataset``)."""
    if path is None:
        return None, None
    from features.datasets import load_dataset

    try:
        data = load_dataset(domain, path)
    except Exception as err:  # name the file, whatever broke
        raise ServingConfigError(f"domain '{domain}': cannot load entity history from {path}: {err}") from err
    return events_of(data), getattr(data, "cases", None)


def body_digest(domain: str, body: bytes) -> str:
    return hashlib.sha256(domain.encode() + b"\0" + body).hexdigest()


class DomainScorer:
    """Champion bundle + online feature state of one domain (see module docstring)."""

    def __init__(self, domain: str, bundle, model_name: str, model_version: str, online: OnlineFeatures,
                 score_seq: int = 0, outcome_seq: int = 0):
        self.domain = domain
        self.info = domain_info(domain)
        self.bundle = bundle
        self.model_name = model_name
        self.model_version = model_version
        self.online = online
        self.fs = online.fs
        self.lock = threading.RLock()
        self.retired = False
        self.stale = False
        self.score_seq = score_seq
        self.outcome_seq = outcome_seq
        self.loaded_at = utcnow()

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def build(cls, domain: str, audit: AuditStore, champion: tuple | None = None) -> DomainScorer:
        """Load the champion (unless given), seed the history, replay the audit store."""
        started = time.perf_counter()
        bundle, name, version = champion or load_champion(domain)
        fs = domain_feature_set(domain, getattr(bundle, "label_delay_days", None))
        if getattr(bundle, "feature_set_version", fs.version) != fs.version:
            raise ServingConfigError(
                f"domain '{domain}': champion {name} v{version} was trained with feature set "
                f"{bundle.feature_set_version!r} but this code computes {fs.version!r}; retrain or deploy matching code"
            )
        if missing := [n for n in bundle.feature_names if n not in fs.names]:
            raise ServingConfigError(
                f"domain '{domain}': champion {name} v{version} needs features this code does not compute "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); retrain or deploy matching code")
        events, cases = load_history(domain, history_path(domain, bundle))
        online = fs.online(events, cases)
        known = set(events[fs.id_col].astype(str)) if events is not None else set()
        scorer = cls(domain, bundle, name, version, online)
        scorer.apply_replay(audit.replay(domain), skip_ids=known)
        log.info("domain %s: champion %s v%s ready with %d history events in %.1fs", domain, name, version,
                 online.events_seen, time.perf_counter() - started)
        return scorer

    def apply_replay(self, replay: Replay, skip_ids: set[str] | None = None) -> None:
        """Ingest audited events, outcome labels (dated by their decision) and cases into the state."""
        events = replay.events
        if skip_ids and len(events):
            events = events[~events[self.fs.id_col].astype(str).isin(skip_ids)]
        if len(events):
            self.online.ingest(events)
        self._ingest_labels(replay.labelled)
        if len(replay.cases):
            self.online.ingest_cases(replay.cases)
        self.score_seq = max(self.score_seq, replay.last_score_seq)
        self.outcome_seq = max(self.outcome_seq, replay.last_outcome_seq)

    def _ingest_labels(self, labelled: pd.DataFrame) -> None:
        """Labels count from ``max(event time + label delay, decision time)``: never before they were known."""
        if not len(labelled):
            return
        frame = labelled.copy()
        if "label_known_at" in frame:
            delay = self.fs.label_delay
            when = np.maximum(frame[self.fs.time_col] + delay, frame.pop("label_known_at"))
            frame[self.fs.time_col] = when - delay
        self.online.ingest_labels(frame)

    # -- scoring -----------------------------------------------------------------------------------------
    def score(self, items: list, caller: RequestMeta, body: bytes, audit: AuditStore) -> ScoreResult:
        """Score validated items (caller must hold ``self.lock``); see module docstring."""
        digest = body_digest(self.domain, body)
        if caller.idempotency_key:
            stored = audit.find_request(caller.key_id, caller.idempotency_key)
            if stored is not None:
                return self._replayed(stored, digest)
        rows = [item.model_dump(mode="json") for item in items]
        frame = events_frame(self.domain, rows)
        feats = feature_columns_in_time_order(self.online, frame)
        explanations = explain(self.bundle, feats, top_n=top_n())
        feature_rows = feature_records(feats, self.fs.names)
        created = utcnow()
        out_items, audit_rows = [], []
        for i, (row, expl) in enumerate(zip(rows, explanations, strict=True)):
            score_id = str(uuid.uuid4())
            reasons = [jsonable(vars(r)) for r in expl.reasons]
            out_items.append({
                "score_id": score_id, "id": row[self.info.id_col], "score": expl.score, "band": expl.band,
                "flagged": bool(expl.flagged), "threshold": float(self.bundle.threshold), "reasons": reasons,
                "base_value": expl.base_value, "raw_margin": expl.raw_margin,
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
        try:
            audit.record_scores(request_row, audit_rows, response)
        except IdempotencyConflict as conflict:  # pragma: no cover - only with several writers
            self.stale = True
            if conflict.stored is not None:
                return self._replayed(conflict.stored, digest)
            raise
        except Exception:
            self.stale = True  # the state ingested events the audit store does not have: rebuild it
            raise
        return ScoreResult(response)

    def _replayed(self, stored, digest: str) -> ScoreResult:
        if stored.body_sha256 != digest:
            raise RequestError(422, "Idempotency-Key was already used with a different request body", [
                {"loc": "header.Idempotency-Key", "msg": "reused with a different request", "type": "conflict"}])
        return ScoreResult(stored.response, replayed=True)

    def _features_in_time_order(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Features of each distinct event time from the state, then ingest it (batch-training semantics)."""
        return features_in_time_order(self.online, frame)

    def record_outcome(self, audit: AuditStore, score_row: dict, outcome: str, note: str | None,
                       decided_by: str, agency: str) -> dict:
        """Store a reviewer outcome and feed it to the state as a label and cases (caller holds the lock)."""
        stored = audit.record_outcome(score_row["score_id"], outcome, note, decided_by, agency)
        self.apply_replay(audit.outcome_replay(self.domain, after_outcome_seq=self.outcome_seq))
        return stored

    def status(self) -> dict[str, Any]:
        return {"model": {"name": self.model_name, "version": self.model_version},
                "feature_set": self.fs.version, "history_events": self.online.events_seen,
                "loaded_at": self.loaded_at.isoformat() + "Z"}


class ScorerRegistry:
    """The live scorer of each served domain; reload swaps a fully built replacement atomically."""

    def __init__(self, domains: list[str], audit: AuditStore):
        self.domains = list(domains)
        self.audit = audit
        self._scorers: dict[str, DomainScorer] = {}
        self._reload_lock = threading.Lock()

    def start(self) -> None:
        """Build every domain's scorer; one error listing every domain that cannot be served."""
        errors = []
        for domain in self.domains:
            try:
                self._scorers = {**self._scorers, domain: DomainScorer.build(domain, self.audit)}
            except ServingConfigError as err:
                errors.append(str(err))
        if errors:
            raise ServingConfigError("cannot start the scoring service:\n  " + "\n  ".join(errors))

    def get(self, domain: str) -> DomainScorer:
        scorer = self._scorers.get(domain)
        if scorer is None:
            raise RequestError(404, f"domain '{domain}' is not served here (RISKSCORE_DOMAINS)")
        return scorer

    def run(self, domain: str, fn):
        """Call ``fn(scorer)`` holding the live scorer's lock (retried on the new one after a swap)."""
        for _ in range(100):
            scorer = self.get(domain)
            with scorer.lock:
                if scorer.retired:
                    continue
                try:
                    return fn(scorer)
                finally:
                    if scorer.stale:
                        threading.Thread(target=self._rebuild_stale, args=(domain,), daemon=True).start()
        raise RuntimeError(f"domain {domain}: scorer kept changing during the request")

    def _rebuild_stale(self, domain: str) -> None:
        try:
            self.reload([domain], force=True)
        except Exception:  # logged; the stale one keeps serving
            log.exception("domain %s: rebuilding the feature state after an audit failure failed", domain)

    def reload(self, domains: list[str] | None = None, force: bool = False) -> dict[str, Any]:
        """Load each domain's current champion; swap in a rebuilt scorer when the version changed (or ``force``)."""
        result: dict[str, Any] = {}
        with self._reload_lock:
            for domain in domains or self.domains:
                old = self.get(domain)
                champion = load_champion(domain)
                if not force and not old.stale and champion[2] == old.model_version and champion[1] == old.model_name:
                    result[domain] = {"version": old.model_version, "changed": False}
                    continue
                new = DomainScorer.build(domain, self.audit, champion)
                with old.lock:  # brief: blocks scoring on the old state while the new one catches up
                    new.apply_replay(self.audit.replay(domain, new.score_seq, new.outcome_seq))
                    self._scorers = {**self._scorers, domain: new}
                    old.retired = True
                log.info("domain %s: swapped champion %s v%s -> v%s", domain, new.model_name, old.model_version,
                         new.model_version)
                result[domain] = {"previous_version": old.model_version, "version": new.model_version,
                                  "changed": True}
        return result

    def status(self) -> dict[str, Any]:
        return {domain: scorer.status() for domain, scorer in self._scorers.items()}


# -- fast paths (bench/RESULTS.md) ------------------------------------------------------------------------
def _row_adder(spec, ex, name: str, source: pd.DataFrame, cols: dict[str, list]):
    """``add(positions)``: ingest rows of ``source`` (plain columns ``cols``) into one executor, without pandas."""
    from features.engine import OnlineAggregate, OnlineDistinct
    from features.graph import OnlineConfirmedLinks, OnlineCycle, _missing

    if isinstance(ex, OnlineAggregate | OnlineDistinct):
        return lambda rows: ex.ingest_columns(cols, rows)
    ts = cols[T_COL]
    if isinstance(ex, OnlineCycle):
        s_col, d_col = ex.spec.edge

        def add_transfers(rows):
            for i in rows:
                s, d = cols[s_col][i], cols[d_col][i]
                if not (_missing(s) or _missing(d) or s == d):
                    ex.add(s, d, int(ts[i]))
        return add_transfers
    if isinstance(ex, OnlineConfirmedLinks):
        if name == ex.spec.sources[1]:
            def add_cases(rows):
                for i in rows:
                    key = cols[ex.spec.case_key][i]
                    if cols["confirmed"][i] > 0 and not _missing(key):
                        ex.add_case(key, int(ts[i]))
            return add_cases
        s_col, d_col = ex.spec.edge

        def add_edges(rows):
            for i in rows:
                s, d = cols[s_col][i], cols[d_col][i]
                if not (_missing(s) or _missing(d) or s == d):
                    ex.add_edge(s, d, int(ts[i]))
        return add_edges
    multi = not isinstance(spec.source, str)  # unknown executor: its own (pandas) ingest
    return lambda rows: ex.ingest(source.iloc[list(rows)], **({"source": name} if multi else {}))


def feature_columns_in_time_order(online: OnlineFeatures, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Model-input columns (``fs.names`` -> array, rows of ``frame``) of a batch, batch-training semantics.

    Items are taken in time order; the items of one distinct time get their features from the state, then are
    ingested, so a later item sees an earlier one and items of the same time do not see each other -- the same
    result as ``online.features(group); online.ingest(group)`` per distinct time, but the row-wise work
    (``prepare``, ``sources``, ``derive``) runs once per batch and the per-time steps touch plain Python values
    only (no pandas per distinct time, which cost ~20-40 ms each).
    """
    fs = online.fs
    if not frame.index.is_unique:
        frame = frame.reset_index(drop=True)
    prepared = fs.prepare(frame)
    n = len(prepared)
    arrays = {c: s.to_numpy() for c, s in prepared.items()}
    sources = fs.sources(events=prepared, labels=None, cases=None)
    plain: dict[str, list] = {}

    def as_list(col: str) -> list:
        if col not in plain:
            plain[col] = arrays[col].tolist()
        return plain[col]

    adders = []  # (source position of each prepared row (-1 = not in the source), add function)
    for name, source in sources.items():
        if source is None or not len(source):
            continue
        if source is prepared:
            pos = np.arange(n)
            src_cols = {c: as_list(c) if arrays[c].dtype == object else arrays[c] for c in arrays}
        else:
            pos = source.index.get_indexer(prepared.index)
            src_cols = {c: source[c].to_numpy(dtype=object).tolist() if source[c].dtype == object
                        else source[c].to_numpy() for c in source.columns}  # keys as Python values, numbers as arrays
        for spec, ex in zip(fs.specs, online.executors, strict=True):
            if (spec.source == name) if isinstance(spec.source, str) else (name in spec.source):
                adders.append((pos, _row_adder(spec, ex, name, source, src_cols)))
    times = arrays[T_COL].astype(np.int64)
    order = np.argsort(times, kind="stable")
    groups = [g.tolist() for g in np.split(order, np.flatnonzero(np.diff(times[order])) + 1)] if n else []
    t_list = times.tolist()
    outputs = []
    for spec, ex in zip(fs.specs, online.executors, strict=True):
        outputs.append((spec, ex.query, [as_list(k) for k in spec.qkeys], [None] * n))
    for group in groups:
        for _spec, query, keys, out in outputs:
            for i in group:
                out[i] = query(tuple(k[i] for k in keys), t_list[i])
        for pos, add in adders:
            rows = [p for p in pos[group].tolist() if p >= 0]
            if rows:
                add(rows)
    columns = dict(arrays)
    for spec, _query, _keys, out in outputs:
        values = np.array(out, dtype=np.float64).reshape(n, len(spec.columns()))
        for j, col in enumerate(spec.columns()):
            columns[col] = values[:, j]
    online.events_seen += n
    derived = fs.derive(columns)
    return {name: np.asarray(derived[name]) for name in fs.names}


def features_in_time_order(online: OnlineFeatures, frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`feature_columns_in_time_order` as the model-input frame (``fs.frame``), index of ``frame``."""
    columns = feature_columns_in_time_order(online, frame)
    return online.fs.frame(columns, frame.index)


_LEVELS: dict[int, dict[str, dict]] = {}


def _level_codes(bundle) -> dict[str, dict]:
    """Categorical column -> {level: code} as LightGBM encodes them (the booster's own training categories)."""
    key = id(bundle.booster)
    if key not in _LEVELS:
        cats = getattr(bundle.booster, "pandas_categorical", None)
        cat_cols = [c for c in bundle.feature_names if c in bundle.categorical]
        if cats is None or len(cats) != len(cat_cols):
            cats = [bundle.categorical[c] for c in cat_cols]
        _LEVELS[key] = {c: {lvl: i for i, lvl in enumerate(levels)} for c, levels in zip(cat_cols, cats, strict=True)}
    return _LEVELS[key]


def model_array(bundle, features) -> np.ndarray:
    """The float64 matrix LightGBM builds from ``bundle.matrix(features)`` (categorical codes, NaN = unseen or
    missing), built directly from columns (a dict of arrays or a frame): no categorical frame, no conversion
    inside ``booster.predict``."""
    levels = _level_codes(bundle)
    names = bundle.feature_names
    n = len(features[names[0]]) if names else 0
    X = np.empty((n, len(names)), np.float64)
    for j, col in enumerate(names):
        values = features[col]
        if col in levels:
            codes = levels[col]
            X[:, j] = [codes.get(v, np.nan) for v in np.asarray(values, dtype=object).tolist()]
        else:
            X[:, j] = np.asarray(values, dtype=np.float64)
    return X


def contrib_threads(rows: int) -> int:
    """LightGBM threads for ``rows`` predictions: 1 for small requests (OpenMP start-up and contention cost more
    than they save: a single-row pred_contrib takes about twice the CPU with 2 threads), all cores for batches."""
    return 1 if rows < 64 else (os.cpu_count() or 1)


def explain(bundle, features, top_n: int = DEFAULT_TOP_N) -> list:
    """``bundle.explain(features, top_n)`` with the same results, from columns (dict of arrays or frame),
    without per-row pandas access."""
    from training.bundle import Explanation, Reason, _plain

    X = model_array(bundle, features)
    contrib = bundle.booster.predict(X, pred_contrib=True, num_threads=contrib_threads(len(X)))
    margins = contrib.sum(axis=1)
    scores = bundle.calibrator(margins)
    names = bundle.feature_names
    labels = [bundle.feature_labels.get(n, n) for n in names]
    values: dict[int, list] = {}
    out = []
    for i in range(len(X)):
        row = contrib[i, :-1]
        reasons = []
        for j in np.argsort(-np.abs(row))[:top_n].tolist():
            if row[j] == 0.0:
                continue
            if j not in values:
                values[j] = np.asarray(features[names[j]]).tolist()
            c = float(row[j])
            reasons.append(Reason(feature=names[j], label=labels[j], value=_plain(values[j][i]), contribution=c,
                                  direction="raises risk" if c > 0 else "lowers risk"))
        score = float(scores[i])
        out.append(Explanation(
            score=score, raw_margin=float(margins[i]), base_value=float(contrib[i, -1]),
            flagged=score >= bundle.threshold, band=bundle.band(score), reasons=reasons,
            contributions=dict(zip(names, row.tolist(), strict=True)),
        ))
    return out


def feature_records(columns: dict[str, np.ndarray], names: list[str]) -> list[dict]:
    """One ``{feature: plain value}`` dict per row (what ``frame.iloc[i].to_dict()`` gave, without pandas)."""
    lists = [np.asarray(columns[n]).tolist() for n in names]
    return [dict(zip(names, row, strict=True)) for row in zip(*lists, strict=True)]

"""Audit store (SQLAlchemy): every scored item, every reviewer outcome, idempotent request replies, and every
accepted request of the other routes (``key_requests``: who read or changed what; the shared rate limit reads it).

Default: SQLite in WAL mode at :func:`riskscore.config.audit_url`; any SQLAlchemy URL (PostgreSQL) works.
A scoring request is written in one transaction (request row + one score row per item) before the
response is sent. Outcomes turn into ``cases`` rows (:meth:`AuditStore.export_cases`) and labelled
events (:meth:`AuditStore.export_labelled_events`) that training reads; :meth:`AuditStore.replay`
feeds the online feature state after a restart or reload.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

try:
    import fcntl
except ImportError:  # not on POSIX: writers rely on SQLite's busy handler alone
    fcntl = None

from features.featureset import LABEL_KNOWN_AT
from features.schemas import TABLES
from riskscore import config
from serving.domains import domain_info

log = logging.getLogger("riskscore.serving.audit")

metadata = sa.MetaData()

requests = sa.Table(
    "requests", metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("domain", sa.String(16), nullable=False),
    sa.Column("caller_key_id", sa.String(16), nullable=False),
    sa.Column("agency", sa.String(64), nullable=False),
    sa.Column("idempotency_key", sa.String(128)),
    sa.Column("body_sha256", sa.String(64), nullable=False),
    sa.Column("items", sa.Integer, nullable=False),
    sa.Column("response_json", sa.JSON, nullable=False),
    sa.UniqueConstraint("caller_key_id", "idempotency_key", name="uq_requests_idempotency"),
)

scores = sa.Table(
    "scores", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("score_id", sa.String(36), nullable=False, unique=True),
    sa.Column("request_id", sa.String(64), sa.ForeignKey("requests.request_id"), nullable=False),
    sa.Column("item_index", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("domain", sa.String(16), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("caller_key_id", sa.String(16), nullable=False),
    sa.Column("agency", sa.String(64), nullable=False),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("input_json", sa.JSON, nullable=False),
    sa.Column("features_json", sa.JSON, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("band", sa.String(32), nullable=False),
    sa.Column("flagged", sa.Boolean, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("explanation_json", sa.JSON, nullable=False),
    sa.Index("ix_scores_domain_seq", "domain", "seq"),
    sa.Index("ix_scores_event", "domain", "event_id"),
)

outcomes = sa.Table(
    "outcomes", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("score_id", sa.String(36), sa.ForeignKey("scores.score_id"), nullable=False, unique=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("note", sa.Text),
    sa.Column("decided_by", sa.String(16), nullable=False),
    sa.Column("agency", sa.String(64), nullable=False),
    sa.Column("decided_at", sa.DateTime, nullable=False),
    sa.CheckConstraint("outcome in ('confirmed', 'cleared')", name="ck_outcome"),
)


reloads = sa.Table(  # POST /admin/reload requests, so that every worker and replica on this store follows them
    "reloads", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("requested_at", sa.DateTime, nullable=False),
    sa.Column("requested_by", sa.String(16), nullable=False),
    sa.Column("domains", sa.JSON),  # null = every served domain
    sa.Column("force", sa.Boolean, nullable=False),
)


key_requests = sa.Table(  # every accepted request of the other routes (reads, outcomes, admin): who, when, what
    "key_requests", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("made_at", sa.DateTime, nullable=False),
    sa.Column("key_id", sa.String(16), nullable=False),
    sa.Column("agency", sa.String(64), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("path", sa.String(256), nullable=False),
)


review_sessions = sa.Table(  # review web page sessions, shared by every worker and replica (serving/review)
    "review_sessions", metadata,
    sa.Column("sid_sha256", sa.String(64), primary_key=True),  # the cookie holds the id; only its hash is here
    sa.Column("key_id", sa.String(16), nullable=False),
    sa.Column("key_sha256", sa.String(64), nullable=False),  # the key's stored hash: a reissued id is not it
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),  # Unix seconds (every process shares the wall clock)
    sa.Column("seen_at", sa.Float, nullable=False),
)


_HEADS_SQL = f"SELECT (SELECT max(seq) FROM {scores.name}), (SELECT max(seq) FROM {outcomes.name})"
_USAGE_HEADS_SQL = f"SELECT (SELECT max(seq) FROM {scores.name}), (SELECT max(seq) FROM {key_requests.name})"


class IdempotencyConflict(Exception):
    """The (caller, Idempotency-Key) pair is already stored; ``stored`` is the earlier request."""

    def __init__(self, stored: StoredRequest | None):
        super().__init__("idempotency key already used")
        self.stored = stored


class OutcomeExists(Exception):
    """A score already has an outcome (outcomes are final; one per score)."""


@dataclass
class StoredRequest:
    request_id: str
    body_sha256: str
    response: dict


@dataclass
class Replay:
    """Audit history of a domain read past two cursors (:meth:`AuditStore.replay`), for the online state."""

    domain: str
    event_rows: list[dict]  # API inputs of the scored events (first scoring of each event id in this read)
    decided: list[sa.Row]  # the domain's reviewer outcomes with their scored inputs
    score_seqs: list[int] = field(default_factory=list)  # every scores row read (all domains)
    outcome_seqs: list[int] = field(default_factory=list)  # every outcomes row read (all domains)

    @property
    def events(self) -> pd.DataFrame:
        """The scored events in contract dtypes."""
        return events_frame(self.domain, self.event_rows)

    @property
    def labelled(self) -> pd.DataFrame:
        """Events with their outcome as label; ``label_known_at`` = when it was decided."""
        return _labelled(self.domain, self.decided)

    @property
    def cases(self) -> pd.DataFrame:
        """The outcomes as ``cases`` contract rows."""
        return _cases(self.domain, self.decided)


GAP_WAIT_S = 60.0  # how long a cursor waits for a seq below its top to commit before giving it up
GAP_WINDOW = 10_000  # holes further than this below the top are not tracked


class SeqCursor:
    """Where a reader of an append-only audit table (``seq`` ascending) stands; tolerant of late commits.

    SQLite hands out seqs in commit order (one writer at a time). PostgreSQL does not: a transaction that took
    seq 10 can commit after one that took seq 11, and a rolled-back insert leaves a hole for good. So the cursor
    keeps the highest seq it has applied (``top``) and the holes below it (``gaps``, seq -> when first missed)
    and reads both next time (:meth:`where`); a hole still empty after :data:`GAP_WAIT_S` is given up. Readers
    read every domain's rows (a domain's seqs are not contiguous) and mark them all (:meth:`mark`).

    A writer's own rows (:meth:`written`) are applied already but must not move ``top`` past rows of other
    processes it has not read: they wait in ``skip`` (left out of reads) until everything below them is read.
    When reads keep missing the rows below one of them for :data:`GAP_WAIT_S` (counted from the first read
    after it was written), those rows are given up like any hole. Thread-safe.
    """

    def __init__(self, clock=time.monotonic, start: int = 0):
        self.top = start  # rows up to ``start`` count as applied (a reader that only wants what comes next)
        self.gaps: dict[int, float] = {}
        self.skip: dict[int, float | None] = {}  # own rows above top -> when a read first looked below them
        self.clock = clock
        self._lock = threading.Lock()

    def behind(self, head: int) -> bool:
        """Whether rows may be unread, given the table's highest seq ``head``."""
        with self._lock:  # own rows in ``skip`` always sit above an unread seq (:meth:`_advance`)
            return head > self.top or bool(self.gaps) or bool(self.skip)

    def where(self, column: sa.ColumnElement) -> list[sa.ColumnElement]:
        """Rows not applied yet, as one condition per query: above the top (not our own), and (if any) in a hole.
        Two queries, not one ``OR``: with the ``OR`` SQLite scanned the whole table instead of two primary-key
        lookups."""
        with self._lock:
            top, gaps, skip = self.top, sorted(self.gaps), sorted(self.skip)
        above = sa.and_(column > top, column.not_in(skip)) if skip else column > top
        return [above, column.in_(gaps)] if gaps else [above]

    def where_sql(self, column: str) -> list[str]:
        """:meth:`where` as SQL text for a driver cursor (the seqs are ints, written in as literals)."""
        with self._lock:
            top, gaps = int(self.top), sorted(int(g) for g in self.gaps)
            skip = sorted(int(s) for s in self.skip)
        above = f"{column} > {top}" + (f" AND {column} NOT IN ({','.join(map(str, skip))})" if skip else "")
        return [above, f"{column} IN ({','.join(map(str, gaps))})"] if gaps else [above]

    def written(self, seqs: list[int]) -> None:
        """This process wrote rows ``seqs`` (applied already): never read them back, never skip what is below."""
        with self._lock:
            for seq in seqs:
                if seq > self.top:
                    self.skip.setdefault(seq, None)
                else:
                    self.gaps.pop(seq, None)
            self._advance()

    def mark(self, seqs: list[int]) -> None:
        """Record rows read and applied (any order); holes below a new top are remembered, old ones expire."""
        with self._lock:
            self._mark(seqs)

    def _mark(self, seqs: list[int]) -> None:
        now = self.clock()
        for seq in sorted(seqs):
            if seq > self.top:
                for hole in range(max(self.top + 1, seq - GAP_WINDOW), seq):
                    if hole not in self.skip:
                        self.gaps[hole] = now
                self.top = seq
            else:
                self.gaps.pop(seq, None)
        self.skip = {s: t for s, t in self.skip.items() if s > self.top}
        self._advance()
        for seq, looked in sorted(self.skip.items()):  # rows below our own ones that reads keep missing
            if looked is None:
                self.skip[seq] = now
            elif now - looked >= GAP_WAIT_S:
                self.top = seq  # given up, like an expired hole
        self.skip = {s: t for s, t in self.skip.items() if s > self.top}
        self._advance()
        if self.gaps:
            floor = self.top - GAP_WINDOW
            self.gaps = {s: t for s, t in self.gaps.items() if s > floor and now - t < GAP_WAIT_S}

    def _advance(self) -> None:
        """Move ``top`` over own rows that directly follow it."""
        while self.top + 1 in self.skip:
            self.top += 1
            del self.skip[self.top]


def _epoch(value: dt.datetime | str) -> float:
    """Epoch seconds of a stored naive-UTC time (SQLite's driver returns the text SQLAlchemy wrote)."""
    when = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    return when.replace(tzinfo=dt.UTC).timestamp()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


_PLAIN = frozenset({str, int, bool, type(None)})


def jsonable(value: Any) -> Any:
    """Plain JSON values (NaN/inf -> None, numpy -> Python, timestamps -> ISO)."""
    kind = type(value)  # fast path for the common exact types (an audit row holds hundreds of values)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind in _PLAIN:
        return value
    if kind is dict:
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp | dt.datetime | dt.date):
        return value.isoformat()
    return value


_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps_json(value: Any) -> str:
    """JSON text of an audit value, as :func:`jsonable` would make it (NaN/inf -> null, numpy -> numbers,
    datetimes -> ISO), encoded by orjson: an audit row holds hundreds of values, and ``json.dumps`` of a
    1000-item batch took about a tenth of the request."""
    return orjson.dumps(value, default=_json_fallback, option=_JSON_OPTIONS).decode()


def dumps_json_bytes(value: Any) -> bytes:
    """:func:`dumps_json` as UTF-8 bytes (HTTP responses)."""
    return orjson.dumps(value, default=_json_fallback, option=_JSON_OPTIONS)


def loads_json(text: str | bytes) -> Any:
    """A stored JSON value, parsed by orjson; text orjson refuses (a lone surrogate escape such as ``"\\ud800"``,
    which rows written with the standard library before orjson may hold) by the standard library."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _json_fallback(value: Any) -> Any:
    out = jsonable(value)
    if out is value:
        raise TypeError(f"{type(value).__name__} is not JSON serializable")
    return out


BUSY_TIMEOUT_S = 30  # SQLite's busy timeout; also the longest wait for the write lock (:class:`WriteLock`)


def _engine(url: str, autocheckpoint: bool = True) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S}, json_serializer=dumps_json,
                                  json_deserializer=loads_json)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL: readers never block the writer
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            if not autocheckpoint:
                cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, json_serializer=dumps_json, json_deserializer=loads_json)


def checkpoint_interval() -> float:
    """Seconds between background WAL checkpoints of the service's SQLite audit store
    ($RISKSCORE_AUDIT_CHECKPOINT_S, default 1)."""
    return float(os.environ.get("RISKSCORE_AUDIT_CHECKPOINT_S", "1"))


class WalCheckpointer:
    """Copies SQLite's write-ahead log into the database file from a background thread.

    SQLite's default checkpoints run inside the commit that crosses 1000 WAL pages, so about 1% of scoring
    requests paid for copying and syncing the log (5-20 ms commits instead of 0.2 ms; ``bench/audit_write.py``).
    Here commits only append to the log, and a daemon thread checkpoints every :func:`checkpoint_interval`
    seconds (``PASSIVE``: it never blocks readers or writers; sqlite3 releases the GIL while it works).
    """

    def __init__(self, engine: sa.Engine, interval: float):
        self.engine, self.interval = engine, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-wal-checkpoint", daemon=True)
        self._thread.start()

    def checkpoint(self, mode: str = "PASSIVE") -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.checkpoint()
            except Exception:  # logged; the next round retries, and the log is still durable
                log.warning("audit WAL checkpoint failed", exc_info=True)

    def stop(self) -> None:
        """Stop the thread and fold the whole log into the database file."""
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.checkpoint("TRUNCATE")
        except Exception:
            log.warning("final audit WAL checkpoint failed", exc_info=True)


class AuditStoreBusy(OperationalError):
    """The audit store's write lock was not free within :data:`BUSY_TIMEOUT_S` (a writer hangs): nothing written."""

    def __init__(self, waited: float):
        super().__init__("acquire the audit write lock", None,
                         TimeoutError(f"the audit write lock was held elsewhere for {waited:.1f}s"))


class WriteLock:
    """Takes turns between writers of one SQLite audit file, across threads and processes (``flock`` on
    ``<db>.lock``), waiting at most ``timeout`` seconds (:class:`AuditStoreBusy`, a 503 in the service).

    SQLite lets one writer in at a time; the others wait in its busy handler, which polls with sleeps of up to
    100 ms, so writers of several service workers on one file saw stalls of 100-500 ms under load. A blocked
    ``flock`` wakes as soon as the holder releases it (polling ``LOCK_NB`` instead let one process take the lock
    again and again: p99 2.5 times higher with two writers), so a writer holding this lock finds SQLite's write
    lock free. The kernel releases it when a process dies; a hung holder makes the others give up after
    ``timeout`` instead of waiting for ever. PostgreSQL and other databases need none (a no-op).
    """

    def __init__(self, db_path: str | None, timeout: float = BUSY_TIMEOUT_S):
        self._thread_lock = threading.Lock()
        self._path = None if db_path is None or fcntl is None else db_path + ".lock"
        self._fd = None if self._path is None else os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        self._held: int | None = None  # the descriptor holding the lock
        self.timeout = timeout

    def __enter__(self) -> WriteLock:
        started = time.monotonic()
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise AuditStoreBusy(time.monotonic() - started)
        if self._fd is not None:
            try:
                self._held = self._flock(started)
            except BaseException:
                self._thread_lock.release()
                raise
        return self

    def _flock(self, started: float) -> int:
        """The descriptor that got the lock: the long-lived one when it is free, else a waiter's own (see
        :class:`_FlockWaiter`)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return self._fd
        except BlockingIOError:
            pass
        waiter = _FlockWaiter(os.open(self._path, os.O_RDWR))
        if waiter.wait(self.timeout - (time.monotonic() - started)):
            return waiter.fd
        raise AuditStoreBusy(time.monotonic() - started)

    def __exit__(self, *_exc) -> None:
        held, self._held = self._held, None
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)
            if held != self._fd:
                os.close(held)
        self._thread_lock.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _FlockWaiter(threading.Thread):
    """A blocking ``flock`` on its own descriptor in a thread, so that the writer can stop waiting: a waiter given
    up on closes its descriptor (releasing the lock) whenever it gets the lock, without touching anyone else's."""

    def __init__(self, fd: int):
        super().__init__(name="riskscore-audit-lock", daemon=True)
        self.fd = fd
        self._got = threading.Event()
        self._guard = threading.Lock()
        self._abandoned = False
        self.start()

    def run(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            self._abandoned = True
        with self._guard:
            if self._abandoned:
                os.close(self.fd)
                return
            self._got.set()

    def wait(self, timeout: float) -> bool:
        """Whether the lock was got within ``timeout`` seconds (if not, the waiter is abandoned)."""
        if self._got.wait(max(timeout, 0.0)):
            return True
        with self._guard:
            if self._got.is_set():
                return True
            self._abandoned = True
            return False


def sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL (None for other databases and in-memory SQLite)."""
    parsed = sa.engine.make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


class AuditStore:
    """Reads and writes the audit tables (created if missing).

    ``background_checkpoint=True`` (the service) moves SQLite's WAL checkpoints off the request path
    (:class:`WalCheckpointer`); other users keep SQLite's automatic checkpoints.
    """

    def __init__(self, url: str | None = None, background_checkpoint: bool = False):
        self.url = url or config.audit_url()
        on_file = self.url.startswith("sqlite") and ":memory:" not in self.url and self.url.rstrip("/") != "sqlite:"
        background = background_checkpoint and on_file
        self.engine = _engine(self.url, autocheckpoint=not background)
        metadata.create_all(self.engine)
        self._checkpointer = WalCheckpointer(self.engine, checkpoint_interval()) if background else None
        self.write_lock = WriteLock(sqlite_file(self.url))

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self.engine.dispose()
        self.write_lock.close()

    # -- scoring ---------------------------------------------------------------------------------------
    def find_request(self, caller_key_id: str, idempotency_key: str) -> StoredRequest | None:
        """The stored request of a (caller, Idempotency-Key) pair, if any."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(requests.c.request_id, requests.c.body_sha256, requests.c.response_json).where(
                    requests.c.caller_key_id == caller_key_id, requests.c.idempotency_key == idempotency_key)
            ).first()
        return StoredRequest(row.request_id, row.body_sha256, row.response_json) if row else None

    def record_scores(self, request: dict, rows: list[dict], response: dict) -> list[int]:
        """Write a request and its score rows in one transaction; duplicate Idempotency-Key -> conflict.

        Returns the seqs the score rows took (a writer marks them in its :class:`SeqCursor`: already applied).
        """
        try:
            with self.write_lock, self.engine.begin() as conn:
                # plain insert() with parameters: SQLAlchemy compiles each statement once and caches it
                conn.execute(requests.insert(), [{**request, "response_json": response}])
                if conn.dialect.insert_executemany_returning:  # one INSERT ... RETURNING (SQLite, PostgreSQL)
                    return list(conn.execute(scores.insert().returning(scores.c.seq), rows).scalars())
                return [conn.execute(scores.insert(), row).inserted_primary_key[0] for row in rows]
        except IntegrityError:
            key = request.get("idempotency_key")
            if key is None:
                raise
            raise IdempotencyConflict(self.find_request(request["caller_key_id"], key)) from None

    def record_key_request(self, key_id: str, agency: str, request_id: str, method: str, path: str) -> int:
        """Write one accepted request of a route other than scoring (scoring requests are their score rows);
        returns its seq (the writer marks it in its usage cursor)."""
        row = {"made_at": utcnow(), "key_id": key_id, "agency": agency, "request_id": request_id,
               "method": method[:8], "path": path[:256]}
        with self.write_lock, self.engine.begin() as conn:
            if conn.dialect.insert_returning:
                return int(conn.execute(key_requests.insert().returning(key_requests.c.seq), row).scalar_one())
            return int(conn.execute(key_requests.insert(), row).inserted_primary_key[0])

    def requests_after(self, scored: SeqCursor, other: SeqCursor | None = None
                       ) -> tuple[list[tuple[str, float]], list[int], list[int]]:
        """Requests recorded past the cursors, for :mod:`serving.usage`: ``(caller key id, epoch seconds)`` per
        scoring request past ``scored`` (its first item's score row) and per request of another route past
        ``other`` (``key_requests``), in time order; then the seqs read of each table. The cursors are not moved.

        Asked before a rate-limited request whenever another process wrote, so it goes straight to the driver
        (with the heads query, 0.47 ms through a SQLAlchemy select against 0.22 ms, ``bench/audit_write.py``)."""
        queries = [(f"SELECT seq, caller_key_id, created_at, item_index FROM {scores.name} WHERE {{}}", scored)]
        if other is not None:
            queries.append((f"SELECT seq, key_id, made_at, 0 FROM {key_requests.name} WHERE {{}}", other))
        found: list[list[tuple]] = []
        conn = self.engine.raw_connection()
        try:
            cur = conn.cursor()
            for sql, cursor in queries:
                rows = []
                for cond in cursor.where_sql("seq"):
                    cur.execute(sql.format(cond))
                    rows.extend(cur.fetchall())
                found.append(rows)
            cur.close()
        finally:
            conn.close()
        made = sorted((_epoch(created), key_id) for rows in found for _, key_id, created, index in rows if index == 0)
        seqs = [sorted(int(row[0]) for row in rows) for rows in found]
        return [(key_id, at) for at, key_id in made], seqs[0], seqs[1] if other is not None else []

    def heads(self) -> tuple[int, int]:
        """The highest seq of the scores and of the outcomes table (0 when empty), in one query.

        Asked before every scoring request, so it goes straight to the driver: 9 us against 120 us through a
        SQLAlchemy ``select`` (compiling and result processing) on the SQLite store."""
        return self._heads(_HEADS_SQL)

    def usage_heads(self) -> tuple[int, int]:
        """The highest seq of the scores and of the ``key_requests`` table (0 when empty), in one query
        (asked before every request of a rate-limited key, :mod:`serving.usage`)."""
        return self._heads(_USAGE_HEADS_SQL)

    def _heads(self, sql: str) -> tuple[int, int]:
        conn = self.engine.raw_connection()
        try:
            cur = conn.cursor()
            cur.execute(sql)
            first, second = cur.fetchone()
            cur.close()
        finally:
            conn.close()
        return int(first or 0), int(second or 0)

    def get_score(self, score_id: str) -> dict | None:
        """A score row with its outcome (if any) as a dict."""
        query = sa.select(scores, outcomes.c.outcome, outcomes.c.note, outcomes.c.decided_at).select_from(
            scores.outerjoin(outcomes, outcomes.c.score_id == scores.c.score_id)
        ).where(scores.c.score_id == score_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return dict(row) if row else None

    def count_scores(self, **where: Any) -> int:
        query = sa.select(sa.func.count()).select_from(scores)
        for col, value in where.items():
            query = query.where(scores.c[col] == value)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    # -- reloads -----------------------------------------------------------------------------------------
    def request_reload(self, domains: list[str] | None, force: bool, requested_by: str) -> int:
        """Record a reload request (its seq) for the other workers and replicas on this store."""
        row = {"requested_at": utcnow(), "requested_by": requested_by, "domains": domains, "force": bool(force)}
        with self.write_lock, self.engine.begin() as conn:
            return int(conn.execute(reloads.insert().values(**row)).inserted_primary_key[0])

    def reloads_after(self, seq: int) -> list[sa.Row]:
        """Reload requests recorded after ``seq``, oldest first."""
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(reloads).where(reloads.c.seq > seq).order_by(reloads.c.seq)))

    def last_reload_seq(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(reloads.c.seq), 0))).scalar_one())

    # -- reviewer workspace (serving/review) ------------------------------------------------------------
    def create_session(self, row: dict, expired_before: float, max_sessions: int) -> None:
        """Store a review session; drop expired ones, and the least recently seen beyond ``max_sessions``."""
        with self.write_lock, self.engine.begin() as conn:
            conn.execute(review_sessions.delete().where(review_sessions.c.seen_at < expired_before))
            count = conn.execute(sa.select(sa.func.count()).select_from(review_sessions)).scalar_one()
            if count >= max_sessions:
                oldest = sa.select(review_sessions.c.sid_sha256).order_by(review_sessions.c.seen_at).limit(
                    count - max_sessions + 1)
                conn.execute(review_sessions.delete().where(review_sessions.c.sid_sha256.in_(oldest)))
            conn.execute(review_sessions.insert().values(**row))

    def get_session(self, sid_sha256: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(review_sessions).where(
                review_sessions.c.sid_sha256 == sid_sha256)).mappings().first()
        return dict(row) if row else None

    def touch_session(self, sid_sha256: str, seen_at: float) -> None:
        with self.write_lock, self.engine.begin() as conn:
            conn.execute(review_sessions.update().where(review_sessions.c.sid_sha256 == sid_sha256)
                         .values(seen_at=seen_at))

    def drop_session(self, sid_sha256: str) -> None:
        with self.write_lock, self.engine.begin() as conn:
            conn.execute(review_sessions.delete().where(review_sessions.c.sid_sha256 == sid_sha256))

    def review_queue(self, *, agency: str | None = None, domain: str | None = None, band: str | None = None,
                     flagged: bool | None = True, status: str | None = None, since: dt.datetime | None = None,
                     until: dt.datetime | None = None, order: str = "newest", limit: int = 25,
                     offset: int = 0) -> QueuePage:
        """Scored items for reviewers, filtered (``agency=None``: every agency) and paginated.

        ``flagged=True`` keeps items at or above their threshold, ``status`` is ``open`` (no outcome yet),
        ``confirmed`` or ``cleared``; ``since``/``until`` bound the scoring time (``until`` exclusive);
        ``order`` is ``newest`` (latest scored first) or ``risk`` (highest score first, then newest).
        """
        if order not in REVIEW_ORDERS:
            raise ValueError(f"unknown order {order!r}: use one of {', '.join(REVIEW_ORDERS)}")
        joined = scores.outerjoin(outcomes, outcomes.c.score_id == scores.c.score_id)
        filters = {"agency": agency, "domain": domain, "band": band, "flagged": flagged, "status": status,
                   "since": since, "until": until}
        count = _review_filters(sa.select(sa.func.count()).select_from(joined), **filters)
        cols = [scores.c.score_id, scores.c.created_at, scores.c.domain, scores.c.event_id, scores.c.agency,
                scores.c.model_name, scores.c.model_version, scores.c.score, scores.c.band, scores.c.flagged,
                scores.c.threshold, scores.c.explanation_json, outcomes.c.outcome, outcomes.c.decided_by,
                outcomes.c.decided_at]
        keys = [scores.c.score.desc(), scores.c.seq.desc()] if order == "risk" else [scores.c.seq.desc()]
        rows_q = _review_filters(sa.select(*cols).select_from(joined), **filters).order_by(*keys)
        rows_q = rows_q.limit(max(1, int(limit))).offset(max(0, int(offset)))
        with self.engine.connect() as conn:
            total = int(conn.execute(count).scalar_one())
            rows = [dict(r) for r in conn.execute(rows_q).mappings()]
        for row in rows:
            reasons = (row.pop("explanation_json") or {}).get("reasons") or []
            row["top_reason"] = reasons[0] if reasons else None
            row["status"] = row["outcome"] or "open"
        return QueuePage(rows=rows, total=total)

    def get_outcome(self, score_id: str) -> dict | None:
        """The outcome row of a score (who decided, when, note), if any."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(outcomes).where(outcomes.c.score_id == score_id)).mappings().first()
        return dict(row) if row else None

    def counterparties(self, account: str, *, agency: str | None = None, limit: int = 10,
                       scan: int = 2000) -> list[dict]:
        """Accounts that ``account`` sent money to or received money from in audited transfers, most recent first.

        Looks at the latest ``scan`` scored transfers touching ``account`` (of ``agency`` unless ``None``); one row
        per counterparty with direction(s), transfer count, amounts per currency, first/last time, highest score.
        """
        src, dst = _finance_party("source_account"), _finance_party("target_account")
        query = (sa.select(scores.c.seq, scores.c.event_id, scores.c.input_json, scores.c.score, scores.c.flagged)
                 .where(scores.c.domain == "finance", sa.or_(src == account, dst == account))
                 .order_by(scores.c.seq.desc()).limit(scan))
        if agency is not None:
            query = query.where(scores.c.agency == agency)
        with self.engine.connect() as conn:
            rows = list(conn.execute(query))
        seen_events: set[str] = set()
        parties: dict[str, dict] = {}
        for row in rows:
            if row.event_id in seen_events:  # the same transfer scored twice counts once (latest scoring)
                continue
            seen_events.add(row.event_id)
            tx = row.input_json
            outgoing = tx.get("source_account") == account
            other = tx.get("target_account") if outgoing else tx.get("source_account")
            if not other or other == account:
                continue
            party = parties.setdefault(other, {
                "account": other, "directions": set(), "transfers": 0, "amounts": {}, "first_seen": None,
                "last_seen": None, "max_score": 0.0, "flagged": 0, "country": None})
            party["directions"].add("sent to" if outgoing else "received from")
            party["transfers"] += 1
            currency = str(tx.get("currency") or "")
            party["amounts"][currency] = party["amounts"].get(currency, 0.0) + float(tx.get("amount") or 0.0)
            when = str(tx.get("timestamp") or "")
            party["first_seen"] = min(filter(None, (party["first_seen"], when)), default=None)
            party["last_seen"] = max(filter(None, (party["last_seen"], when)), default=None)
            party["max_score"] = max(party["max_score"], float(row.score))
            party["flagged"] += int(bool(row.flagged))
            party["country"] = party["country"] or tx.get("target_country" if outgoing else "source_country")
        out = sorted(parties.values(), key=lambda p: (p["last_seen"] or "", p["transfers"]), reverse=True)[:limit]
        for party in out:
            party["directions"] = sorted(party["directions"])
        return out

    def account_cases(self, accounts: list[str], *, agency: str | None = None) -> dict[str, dict]:
        """Reviewer outcomes (cases) on transfers touching each account: confirmed/cleared counts and the last one."""
        accounts = [a for a in dict.fromkeys(accounts) if a]
        out = {a: {"confirmed": 0, "cleared": 0, "last_outcome": None, "last_decided_at": None} for a in accounts}
        if not accounts:
            return out
        src, dst = _finance_party("source_account"), _finance_party("target_account")
        query = (sa.select(scores.c.input_json, outcomes.c.outcome, outcomes.c.decided_at)
                 .join(outcomes, outcomes.c.score_id == scores.c.score_id)
                 .where(scores.c.domain == "finance", sa.or_(src.in_(accounts), dst.in_(accounts)))
                 .order_by(outcomes.c.seq))
        if agency is not None:
            query = query.where(scores.c.agency == agency)
        with self.engine.connect() as conn:
            rows = list(conn.execute(query))
        for row in rows:
            for acct in {row.input_json.get("source_account"), row.input_json.get("target_account")}:
                if acct in out:
                    stats = out[acct]
                    stats[row.outcome] += 1
                    stats["last_outcome"], stats["last_decided_at"] = row.outcome, row.decided_at
        return out

    # -- outcomes --------------------------------------------------------------------------------------
    def record_outcome(self, score_id: str, outcome: str, note: str | None, decided_by: str, agency: str,
                       decided_at: dt.datetime | None = None) -> dict:
        """Store a reviewer's decision; returns the stored row.

        One decision per event: an event scored more than once (each scoring has its own score id) takes the
        first decision on any of its scores, and a second one is refused (:class:`OutcomeExists`), so training
        and the online state get one label per event."""
        row = {"score_id": score_id, "outcome": outcome, "note": note, "decided_by": decided_by,
               "agency": agency, "decided_at": decided_at or utcnow()}
        same_event = scores.alias("same_event")
        earlier = (sa.select(outcomes.c.score_id, outcomes.c.agency)
                   .join(same_event, outcomes.c.score_id == same_event.c.score_id)
                   .join(scores, sa.and_(scores.c.domain == same_event.c.domain,
                                         scores.c.event_id == same_event.c.event_id))
                   .where(scores.c.score_id == score_id).limit(1))
        try:
            with self.write_lock, self.engine.begin() as conn:
                if (other := conn.execute(earlier).first()) is not None:
                    where = (f"on score {other.score_id}" if other.agency == agency
                             else "recorded by another agency")  # whose score ids this reviewer may not see
                    raise OutcomeExists(f"score {score_id} already has an outcome" if other.score_id == score_id
                                        else f"the event of score {score_id} already has an outcome ({where})")
                row["seq"] = conn.execute(outcomes.insert().values(**row)).inserted_primary_key[0]
        except IntegrityError:
            raise OutcomeExists(f"score {score_id} already has an outcome") from None
        return row

    # -- exports for training and replay ---------------------------------------------------------------
    def _decided(self, domain: str, skip_event_ids: Collection[str] = ()) -> list[sa.Row]:
        """The first decision on each event of ``domain`` (see :meth:`record_outcome`), except on ``skip_event_ids``."""
        query = (
            sa.select(scores.c.score_id, scores.c.event_id, scores.c.created_at, scores.c.input_json,
                      outcomes.c.seq, outcomes.c.outcome, outcomes.c.note, outcomes.c.decided_at)
            .join(outcomes, outcomes.c.score_id == scores.c.score_id)
            .where(scores.c.domain == domain)
            .order_by(outcomes.c.seq)
        )
        with self.engine.connect() as conn:
            return first_per_event(conn.execute(query), set(skip_event_ids))

    def export_cases(self, domain: str, skip_event_ids: Collection[str] = ()) -> pd.DataFrame:
        """Reviewer outcomes as rows of the ``cases`` contract (one per entity of the scored event); none for
        ``skip_event_ids`` (events with a label of their own in the data)."""
        return _cases(domain, self._decided(domain, skip_event_ids))

    def export_labelled_events(self, domain: str, skip_event_ids: Collection[str] = ()) -> pd.DataFrame:
        """Scored events with their reviewer outcome as the label column (1 = confirmed), contract dtypes, and
        ``label_known_at`` (the decision time: features of later events see the label from then on); none for
        ``skip_event_ids``."""
        return _labelled(domain, self._decided(domain, skip_event_ids))

    def export_scored_events(self, domain: str, skip_event_ids: Collection[str] = ()) -> pd.DataFrame:
        """Every event of ``domain`` the service scored (its first scoring, as the service's state holds it; none of
        ``skip_event_ids``), in contract dtypes, labelled by the first reviewer decision where there is one
        (``label_known_at`` = its time) and unlabelled otherwise: the entity histories that training shares with
        the service."""
        skip = set(skip_event_ids)
        query = (sa.select(scores.c.event_id, scores.c.input_json).where(scores.c.domain == domain)
                 .order_by(scores.c.seq))
        with self.engine.connect() as conn:
            first = first_per_event(conn.execute(query), skip)
        decided = {r.event_id: r for r in self._decided(domain, skip)}
        label = domain_info(domain).label_col
        rows = [{**r.input_json, label: int(decided[r.event_id].outcome == "confirmed")} if r.event_id in decided
                else dict(r.input_json) for r in first]
        out = events_frame(domain, rows)
        out[LABEL_KNOWN_AT] = pd.to_datetime(pd.Series(
            [decided[r.event_id].decided_at if r.event_id in decided else None for r in first], dtype="object"),
        ).astype("datetime64[ns]").to_numpy()
        return out

    def recent_features(self, domain: str, limit: int = 5000, model_version: str | None = None,
                        ) -> tuple[pd.DataFrame, np.ndarray]:
        """Features (one row per score, oldest first) and scores of the latest ``limit`` scored items of
        ``domain`` (optionally of one model version): what drift monitoring compares to the model's reference."""
        query = (sa.select(scores.c.features_json, scores.c.score).where(scores.c.domain == domain)
                 .order_by(scores.c.seq.desc()).limit(max(1, int(limit))))
        if model_version is not None:
            query = query.where(scores.c.model_version == str(model_version))
        with self.engine.connect() as conn:
            rows = list(conn.execute(query))[::-1]
        feats = pd.DataFrame.from_records([r.features_json for r in rows]) if rows else pd.DataFrame()
        return feats, np.asarray([r.score for r in rows], dtype=np.float64)

    def replay(self, domain: str, score_cursor: SeqCursor | None = None, outcome_cursor: SeqCursor | None = None,
               ) -> Replay:
        """Scored events and outcomes of ``domain`` past the cursors (labels dated by their decision).

        The cursors are not moved: the caller marks ``score_seqs``/``outcome_seqs`` once it applied the replay.
        Both tables are read in one connection; other domains' rows come back as seqs only.
        """
        score_cursor, outcome_cursor = score_cursor or SeqCursor(), outcome_cursor or SeqCursor()
        mine = scores.c.domain == domain
        score_q = sa.select(scores.c.seq, scores.c.event_id, mine.label("mine"),
                            sa.type_coerce(sa.case((mine, scores.c.input_json)), sa.JSON).label("input_json"))
        outcome_q = (sa.select(outcomes.c.seq, mine.label("mine"), scores.c.score_id, scores.c.event_id,
                               scores.c.created_at,
                               sa.type_coerce(sa.case((mine, scores.c.input_json)), sa.JSON).label("input_json"),
                               outcomes.c.outcome, outcomes.c.note, outcomes.c.decided_at)
                     .join(scores, outcomes.c.score_id == scores.c.score_id))
        with self.engine.connect() as conn:
            score_rows = sorted((row for cond in score_cursor.where(scores.c.seq)
                                 for row in conn.execute(score_q.where(cond))), key=lambda r: r.seq)
            outcome_rows = sorted((row for cond in outcome_cursor.where(outcomes.c.seq)
                                   for row in conn.execute(outcome_q.where(cond))), key=lambda r: r.seq)
        first = first_per_event(r for r in score_rows if r.mine)
        return Replay(domain=domain, event_rows=[r.input_json for r in first],
                      decided=[r for r in outcome_rows if r.mine], score_seqs=[r.seq for r in score_rows],
                      outcome_seqs=[r.seq for r in outcome_rows])


def first_per_event(rows, skip_event_ids: Collection[str] = (), seen: set[str] | None = None) -> list[sa.Row]:
    """The first of ``rows`` (oldest first) of each event id not in ``skip_event_ids`` nor ``seen``; ``seen`` is
    updated. For outcomes: an event has one label, its first decision (a second one is refused when written; this
    also covers stores written before); for scorings: the state holds an event's first scoring."""
    seen = set() if seen is None else seen
    out = []
    for row in rows:
        if row.event_id not in seen and row.event_id not in skip_event_ids:
            seen.add(row.event_id)
            out.append(row)
    return out


CASE_COLUMNS = ["case_id", "entity_kind", "entity_id", "opened_at", "closed_at", "outcome", "source", "note"]


def _cases(domain: str, decided: list[sa.Row]) -> pd.DataFrame:
    """Reviewer cases of decided events: closed at the decision, but never before the event's own time. A decision
    can carry an earlier time than the event (customs dates are midnight UTC, decided a few hours into that day in
    an office east of UTC; a pre-lodged declaration), and features count cases closed strictly before an event:
    the event would see its own outcome."""
    info = domain_info(domain)
    out = []
    for row in decided:
        event_time = pd.Timestamp(row.input_json[info.time_col]).tz_localize(None).to_pydatetime()
        for kind, col in info.case_entities:
            if entity := row.input_json.get(col):
                out.append({
                    "case_id": f"{row.score_id}:{col}", "entity_kind": kind, "entity_id": entity,
                    "opened_at": row.created_at, "closed_at": max(row.decided_at, event_time),
                    "outcome": row.outcome, "source": "reviewer", "note": row.note,
                })
    frame = pd.DataFrame(out, columns=CASE_COLUMNS)
    for col in ("case_id", "entity_kind", "entity_id", "outcome", "source", "note"):
        frame[col] = frame[col].astype("string")
    for col in ("opened_at", "closed_at"):
        frame[col] = pd.to_datetime(frame[col]).astype("datetime64[ns]")
    return frame


def _labelled(domain: str, decided: list[sa.Row]) -> pd.DataFrame:
    label = domain_info(domain).label_col
    out = events_frame(domain, [{**r.input_json, label: int(r.outcome == "confirmed")} for r in decided])
    out[LABEL_KNOWN_AT] = pd.to_datetime(pd.Series([r.decided_at for r in decided], dtype="object")
                                         ).astype("datetime64[ns]").to_numpy()
    return out


def events_frame(domain: str, rows: list[dict]) -> pd.DataFrame:
    """Event dicts (validated API inputs, optionally with the label) -> a frame in the contract's dtypes."""
    info = domain_info(domain)
    data: dict[str, Any] = {}
    for col in TABLES[info.table]:
        if not (col.required or col.name == info.label_col):
            continue
        values = [r.get(col.name) for r in rows]
        if col.kind == "str":
            data[col.name] = pd.array(values, dtype="string")
        elif col.kind == "datetime":
            data[col.name] = pd.to_datetime(pd.Series(values, dtype="object")).astype("datetime64[ns]").to_numpy()
        elif col.kind == "int":
            data[col.name] = pd.array(values, dtype="Int8")
        else:
            data[col.name] = np.asarray(values, dtype=np.float64)
    return pd.DataFrame(data)


# -- reviewer workspace queries (serving/review) -----------------------------------------------------------
REVIEW_STATUSES = ("open", "confirmed", "cleared")
REVIEW_ORDERS = ("newest", "risk")


@dataclass
class QueuePage:
    """One page of the review queue: rows (newest or riskiest first) and the total matching the filters."""

    rows: list[dict]
    total: int


def _review_filters(query, *, agency: str | None, domain: str | None, band: str | None, flagged: bool | None,
                    status: str | None, since: dt.datetime | None, until: dt.datetime | None):
    if agency is not None:
        query = query.where(scores.c.agency == agency)
    if domain:
        query = query.where(scores.c.domain == domain)
    if band:
        query = query.where(scores.c.band == band)
    if flagged is not None:
        query = query.where(scores.c.flagged == flagged)
    if status == "open":
        query = query.where(outcomes.c.score_id.is_(None))
    elif status in ("confirmed", "cleared"):
        query = query.where(outcomes.c.outcome == status)
    elif status:
        raise ValueError(f"unknown status {status!r}: use one of {', '.join(REVIEW_STATUSES)}")
    if since is not None:
        query = query.where(scores.c.created_at >= since)
    if until is not None:
        query = query.where(scores.c.created_at < until)
    return query


def _finance_party(side: str):
    return scores.c.input_json[side].as_string()

"""Browser sessions of the review workspace: an opaque random id in an HttpOnly, SameSite=Strict cookie.

Sessions live in the audit store, so every worker and replica of the service knows them (a reviewer's requests may
reach any of them). The store keeps the hash of the session id (the id itself is only in the cookie), the key's id
and hash, a CSRF token and two times; never the API key. Each request finds the key by its id in the current key
store, so a revoked key (after ``POST /admin/reload``) ends its sessions at once. Sessions end at logout, after
``$RISKSCORE_REVIEW_SESSION_HOURS`` (default 8) or ``$RISKSCORE_REVIEW_IDLE_MINUTES`` (default 60) without a
request. Each session has its own CSRF token, sent back in every form and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

COOKIE = "riskscore_review"
LOGIN_COOKIE = "riskscore_review_login"  # pre-login CSRF token (double submit)
MAX_SESSIONS = 5000
TOUCH_EVERY_S = 10.0  # the idle clock is written at most this often per session (one write, not one per page)


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class Session:
    sid: str = field(repr=False)
    key_id: str
    key_sha256: str = field(repr=False)
    csrf: str = field(repr=False)
    created: float
    seen: float


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class SessionStore:
    """Sessions in the audit store given by ``audit()`` (:class:`serving.audit.AuditStore`)."""

    def __init__(self, audit: Callable, ttl_s: float | None = None, idle_s: float | None = None, clock=time.time):
        self.audit = audit
        self.ttl_s = ttl_s if ttl_s is not None else _env_float("RISKSCORE_REVIEW_SESSION_HOURS", 8) * 3600
        self.idle_s = idle_s if idle_s is not None else _env_float("RISKSCORE_REVIEW_IDLE_MINUTES", 60) * 60
        self.clock = clock

    def create(self, key_id: str, key_sha256: str) -> Session:
        now = self.clock()
        session = Session(sid=secrets.token_urlsafe(32), key_id=key_id, key_sha256=key_sha256,
                          csrf=secrets.token_urlsafe(32), created=now, seen=now)
        self.audit().create_session(
            {"sid_sha256": _digest(session.sid), "key_id": key_id, "key_sha256": key_sha256, "csrf": session.csrf,
             "created_at": now, "seen_at": now}, expired_before=now - self.idle_s, max_sessions=MAX_SESSIONS)
        return session

    def get(self, sid: str | None) -> Session | None:
        """The live session of cookie value ``sid`` (its idle clock restarted), or None."""
        if not sid or len(sid) > 128:
            return None
        row = self.audit().get_session(_digest(sid))
        if row is None:
            return None
        now = self.clock()
        if now - row["created_at"] > self.ttl_s or now - row["seen_at"] > self.idle_s:
            self.audit().drop_session(row["sid_sha256"])
            return None
        if now - row["seen_at"] >= TOUCH_EVERY_S:
            self.audit().touch_session(row["sid_sha256"], now)
        return Session(sid=sid, key_id=row["key_id"], key_sha256=row["key_sha256"], csrf=row["csrf"],
                       created=row["created_at"], seen=now)

    def drop(self, sid: str | None) -> None:
        if sid:
            self.audit().drop_session(_digest(sid))


def same_token(expected: str | None, presented: str | None) -> bool:
    """Constant-time comparison of two CSRF tokens (False if either is missing)."""
    if not expected or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())

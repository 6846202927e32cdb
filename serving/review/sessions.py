"""Browser sessions of the review workspace: an opaque random id in an HttpOnly, SameSite=Strict cookie.

The API key a reviewer types at login stays in this process's memory (never in a URL, a page, a log or on
disk); the cookie holds only a random session id. Each session has its own CSRF token, sent back in every
form and compared in constant time. Sessions end at logout, after ``$RISKSCORE_REVIEW_SESSION_HOURS``
(default 8) or ``$RISKSCORE_REVIEW_IDLE_MINUTES`` (default 60) without a request, and when the service
restarts; the key is re-checked against the key store on every request, so a revoked key (after
``POST /admin/reload``) ends its sessions too.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass, field

COOKIE = "riskscore_review"
LOGIN_COOKIE = "riskscore_review_login"  # pre-login CSRF token (double submit)
MAX_SESSIONS = 5000


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class Session:
    sid: str
    key: str = field(repr=False)
    csrf: str = field(repr=False)
    key_id: str
    role: str
    agency: str
    created: float
    seen: float


class SessionStore:
    """In-memory sessions (one service worker per replica, see ``serving.service``)."""

    def __init__(self, ttl_s: float | None = None, idle_s: float | None = None, clock=time.monotonic):
        self.ttl_s = ttl_s if ttl_s is not None else _env_float("RISKSCORE_REVIEW_SESSION_HOURS", 8) * 3600
        self.idle_s = idle_s if idle_s is not None else _env_float("RISKSCORE_REVIEW_IDLE_MINUTES", 60) * 60
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, key: str, key_id: str, role: str, agency: str) -> Session:
        now = self.clock()
        session = Session(sid=secrets.token_urlsafe(32), key=key, csrf=secrets.token_urlsafe(32), key_id=key_id,
                          role=role, agency=agency, created=now, seen=now)
        with self._lock:
            self._expire(now)
            if len(self._sessions) >= MAX_SESSIONS:  # drop the least recently used
                oldest = min(self._sessions.values(), key=lambda s: s.seen)
                self._sessions.pop(oldest.sid, None)
            self._sessions[session.sid] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        now = self.clock()
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            if now - session.created > self.ttl_s or now - session.seen > self.idle_s:
                self._sessions.pop(sid, None)
                return None
            session.seen = now
            return session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def _expire(self, now: float) -> None:
        dead = [sid for sid, s in self._sessions.items()
                if now - s.created > self.ttl_s or now - s.seen > self.idle_s]
        for sid in dead:
            del self._sessions[sid]

    def __len__(self) -> int:
        return len(self._sessions)


def same_token(expected: str | None, presented: str | None) -> bool:
    """Constant-time comparison of two CSRF tokens (False if either is missing)."""
    if not expected or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())

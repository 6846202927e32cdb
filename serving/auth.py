"""API keys: only SHA-256 hashes are stored; each key has one role and belongs to one agency.

Keys come from, in order: the file at ``$RISKSCORE_KEYS_FILE`` (JSON or TOML), ``$RISKSCORE_API_KEYS``
(``role:agency:sha256hex`` entries separated by commas, or the same JSON as a file), the file
``<RISKSCORE_HOME>/keys.json`` if it exists, else demo keys (one per role, agency ``demo``) written to
``<RISKSCORE_HOME>/demo-keys.json`` with mode 0600 -- the only place a plaintext key is ever written.

A key file holds ``{"keys": [{"id": ..., "sha256": ..., "role": ..., "agency": ...}]}``. Keys are
compared by hash with :func:`hmac.compare_digest` against every entry; a key is never logged or echoed.

Rate limits: every key has a token bucket (:class:`RateLimiter`): ``$RISKSCORE_RATE_LIMIT`` requests per
second (default 100; ``0`` = off) with bursts of ``$RISKSCORE_RATE_BURST`` (default 5 x the rate, at least 1).
A key entry may carry its own ``"rate"`` and ``"burst"``; past the limit a request gets 429 with ``Retry-After``.
Each worker holds the buckets in memory and also charges them with the requests that other workers and replicas
recorded in the shared audit store (:meth:`RateLimiter.charge`, ``serving.usage``), so a key's limit holds
across the deployment.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from riskscore import config

log = logging.getLogger("riskscore.serving.auth")

ROLES = ("customs", "financial", "reviewer", "admin")
PERMISSIONS: dict[str, frozenset[str]] = {
    "score:customs": frozenset({"customs"}),
    "score:finance": frozenset({"financial"}),
    "scores:read": frozenset({"reviewer", "admin"}),
    "outcomes:write": frozenset({"reviewer"}),
    "admin": frozenset({"admin"}),
}
KEY_PREFIX = "rsk_"
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,16}")  # audit columns hold 16 characters
DEMO_AGENCY = "demo"
DEFAULT_RATE = 100.0  # requests per second per key
DEFAULT_BURST_FACTOR = 5.0


class AuthError(Exception):
    """401 (no or unknown key), 403 (key lacks the permission) or 429 (rate limit; ``retry_after`` seconds)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


MAX_AGENCY = 64


@dataclass(frozen=True)
class KeyEntry:
    """A stored key: its hash, role and agency; ``id`` is a public hash prefix used in audit rows."""

    sha256: str
    role: str
    agency: str
    id: str = ""
    rate: float | None = None  # requests per second; None = $RISKSCORE_RATE_LIMIT, 0 = unlimited
    burst: float | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}: use one of {', '.join(ROLES)}")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError("a key entry's sha256 must be 64 lower-case hex digits")
        if not self.agency.strip():
            raise ValueError("a key entry needs an agency")
        if len(self.agency) > MAX_AGENCY:  # the audit store's agency columns
            raise ValueError(f"a key entry's agency must be at most {MAX_AGENCY} characters")
        if not self.id:
            object.__setattr__(self, "id", self.sha256[:12])
        if not KEY_ID.fullmatch(self.id):
            raise ValueError(f"a key entry's id must be 1 to 16 letters, digits, '.', '_' or '-' (got {self.id!r})")
        for name in ("rate", "burst"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"a key entry's {name} must be a number >= 0")

    def caller(self) -> Caller:
        return Caller(key_id=self.id, role=self.role, agency=self.agency, rate=self.rate, burst=self.burst)


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of a request."""

    key_id: str
    role: str
    agency: str
    rate: float | None = None
    burst: float | None = None

    def can(self, permission: str) -> bool:
        return self.role in PERMISSIONS[permission]


def default_rate() -> tuple[float, float | None]:
    """``($RISKSCORE_RATE_LIMIT, $RISKSCORE_RATE_BURST)``: per-key requests per second (0 = off) and burst."""
    try:
        rate = float(os.environ.get("RISKSCORE_RATE_LIMIT", DEFAULT_RATE))
        burst = os.environ.get("RISKSCORE_RATE_BURST")
        burst_value = float(burst) if burst else None
    except ValueError as err:
        raise ValueError(f"RISKSCORE_RATE_LIMIT / RISKSCORE_RATE_BURST must be numbers: {err}") from None
    if not math.isfinite(rate) or rate < 0 or (burst_value is not None and not burst_value >= 0):
        raise ValueError("RISKSCORE_RATE_LIMIT / RISKSCORE_RATE_BURST must be finite numbers >= 0")
    return rate, burst_value


class RateLimiter:
    """Token buckets per key id (thread-safe, in process memory), on the wall clock so that requests recorded by
    other processes can be charged at the time they were made (:meth:`charge`)."""

    def __init__(self, rate: float | None = None, burst: float | None = None, clock=time.time):
        env_rate, env_burst = default_rate()
        self.rate = env_rate if rate is None else rate
        self.burst = env_burst if burst is None else burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, time)
        self._lock = threading.Lock()

    def limits(self, caller: Caller) -> tuple[float, float]:
        rate = self.rate if caller.rate is None else caller.rate
        burst = caller.burst if caller.burst is not None else self.burst
        if burst is None:
            burst = rate * DEFAULT_BURST_FACTOR
        return rate, max(burst, 1.0)

    def limited(self, caller: Caller) -> bool:
        return self.limits(caller)[0] > 0

    def _refilled(self, key_id: str, rate: float, burst: float, at: float) -> tuple[float, float]:
        """The bucket's tokens at ``at`` (never earlier than its last change) and that time."""
        tokens, last = self._buckets.get(key_id, (burst, at))
        when = max(at, last)
        return min(burst, tokens + (when - last) * rate), when

    def take(self, caller: Caller) -> None:
        """Spend one token of the caller's bucket; :class:`AuthError` 429 with ``Retry-After`` when empty."""
        rate, burst = self.limits(caller)
        if rate <= 0:
            return
        with self._lock:
            tokens, when = self._refilled(caller.key_id, rate, burst, self.clock())
            if tokens >= 1.0:
                self._buckets[caller.key_id] = (tokens - 1.0, when)
                return
            self._buckets[caller.key_id] = (tokens, when)
        wait = max(1, math.ceil((1.0 - tokens) / rate))
        raise AuthError(429, f"rate limit of {rate:g} requests/s for this key exceeded; retry in {wait}s",
                        retry_after=wait)

    def charge(self, caller: Caller, at: float) -> None:
        """Spend one token for a request the caller made at wall time ``at`` in another worker or replica.

        The bucket is refilled up to ``at`` first (up to its last change if that is later, and never past now),
        and may go below zero: the key then waits until the deployment as a whole is back under its limit."""
        rate, burst = self.limits(caller)
        if rate <= 0:
            return
        with self._lock:
            tokens, when = self._refilled(caller.key_id, rate, burst, min(at, self.clock()))
            self._buckets[caller.key_id] = (tokens - 1.0, when)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """The configured key hashes; :meth:`authenticate` maps a presented key to a :class:`Caller`."""

    def __init__(self, entries: list[KeyEntry], source: str):
        if not entries:
            raise ValueError(f"no API keys configured in {source}")
        for field in ("sha256", "id"):  # the id names the caller in the audit trail and scopes Idempotency-Keys
            values = [getattr(e, field) for e in entries]
            if dupes := sorted({v for v in values if values.count(v) > 1}):
                shown = dupes[0] if field == "id" else dupes[0][:12] + "..."
                raise ValueError(f"{source}: two key entries have the same {field} ({shown}); each key needs its own")
        self.entries = list(entries)
        self.source = source

    def authenticate(self, presented: str | None) -> Caller:
        """The caller owning ``presented``; 401 if missing or unknown (constant-time over all entries)."""
        if not presented:
            raise AuthError(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'")
        digest = hash_key(presented).encode()
        found = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.sha256.encode()):
                found = entry
        if found is None:
            raise AuthError(401, "invalid API key")
        return found.caller()

    def entry(self, key_id: str) -> KeyEntry | None:
        """The configured key with id ``key_id`` (None if there is none)."""
        for entry in self.entries:
            if entry.id == key_id:
                return entry
        return None

    def caller(self, key_id: str) -> Caller | None:
        """The caller owning key id ``key_id`` (None if no configured key has it)."""
        entry = self.entry(key_id)
        return entry.caller() if entry is not None else None

    def authorize(self, presented: str | None, permission: str) -> Caller:
        """Authenticate, then 403 unless the caller's role grants ``permission``."""
        return _permitted(self.authenticate(presented), permission)

    def authorize_session(self, key_id: str, key_sha256: str, permission: str) -> Caller:
        """The caller of a review session's key (its id and hash): 401 once that key is no longer configured
        (revoked, or its id given to another key), 403 unless its role grants ``permission``."""
        entry = self.entry(key_id)
        if entry is None or not hmac.compare_digest(entry.sha256.encode(), key_sha256.encode()):
            raise AuthError(401, "the session's API key is no longer valid")
        return _permitted(entry.caller(), permission)


def _permitted(caller: Caller, permission: str) -> Caller:
    if not caller.can(permission):
        raise AuthError(403, f"role '{caller.role}' may not use this endpoint")
    return caller


def presented_key(headers) -> str | None:
    """The key of a request: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    auth = headers.get("authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return (headers.get("x-api-key") or "").strip() or None


def _entries(doc: dict | list) -> list[KeyEntry]:
    rows = doc.get("keys", []) if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise ValueError("keys must be a list of {sha256, role, agency} entries")
    out = []
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError("each key entry must be an object with sha256, role and agency")
        out.append(KeyEntry(sha256=str(row.get("sha256", "")).lower(), role=str(row.get("role", "")),
                            agency=str(row.get("agency", "")), id=str(row.get("id", "")),
                            rate=row.get("rate"), burst=row.get("burst")))
    return out


def read_key_file(path: str | Path) -> list[KeyEntry]:
    """Entries of a JSON or TOML key file (TOML: ``[[keys]]`` tables)."""
    path = Path(path)
    try:
        text = path.read_text()
        doc = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return _entries(doc)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"cannot read API keys from {path}: {err}") from None


def parse_env_keys(value: str) -> list[KeyEntry]:
    """``RISKSCORE_API_KEYS``: JSON like a key file, or ``role:agency:sha256hex`` entries."""
    value = value.strip()
    if value[:1] in "[{":
        return _entries(json.loads(value))
    out = []
    for item in value.replace("\n", ",").split(","):
        if item.strip():
            role, agency, digest = (p.strip() for p in item.strip().split(":", 2))
            out.append(KeyEntry(sha256=digest.lower(), role=role, agency=agency))
    return out


def default_key_file() -> Path:
    return Path(os.environ.get("RISKSCORE_KEYS_FILE") or config.home() / "keys.json")


def demo_key_file() -> Path:
    return config.home() / "demo-keys.json"


def _write_private(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def demo_keys() -> list[KeyEntry]:
    """One key per role for agency ``demo``, kept (plaintext, mode 0600) in ``demo-keys.json``."""
    path = demo_key_file()
    if path.exists():
        doc = json.loads(path.read_text())
    else:
        doc = {"note": "demo keys for a local service; do not use in production",
               "keys": [{"role": role, "agency": DEMO_AGENCY, "key": new_key()} for role in ROLES]}
        _write_private(path, doc)
    log.warning("no API keys configured: demo keys (one per role) are in %s", path)
    return [KeyEntry(sha256=hash_key(k["key"]), role=k["role"], agency=k["agency"]) for k in doc["keys"]]


def load_keys() -> KeyStore:
    """The key store from the configured source (see module docstring)."""
    if env_file := os.environ.get("RISKSCORE_KEYS_FILE"):
        return KeyStore(read_key_file(env_file), f"RISKSCORE_KEYS_FILE ({env_file})")
    if env_keys := os.environ.get("RISKSCORE_API_KEYS"):
        try:
            return KeyStore(parse_env_keys(env_keys), "RISKSCORE_API_KEYS")
        except ValueError as err:
            raise ValueError(f"RISKSCORE_API_KEYS is invalid: {err}") from None
    home_file = config.home() / "keys.json"
    if home_file.exists():
        return KeyStore(read_key_file(home_file), str(home_file))
    return KeyStore(demo_keys(), str(demo_key_file()))


def entry_doc(entry: KeyEntry) -> dict:
    """A key entry as stored in a key file (no null rate/burst)."""
    return {k: v for k, v in asdict(entry).items() if v is not None}


def add_key(role: str, agency: str, path: str | Path | None = None, rate: float | None = None,
            burst: float | None = None) -> tuple[str, KeyEntry, Path]:
    """Create a key for ``role``/``agency`` (optional own rate limit), append its hash to the key file; return
    the plaintext key once."""
    path = Path(path) if path else default_key_file()
    if path.suffix == ".toml":
        raise ValueError("keys are added to JSON key files; convert the TOML file or pass --file keys.json")
    entries = read_key_file(path) if path.exists() else []
    key = new_key()
    entry = KeyEntry(sha256=hash_key(key), role=role, agency=agency, rate=rate, burst=burst)
    entries.append(entry)
    _write_private(path, {"keys": [entry_doc(e) for e in entries]})
    return key, entry, path


def revoke_key(key_id: str, path: str | Path | None = None) -> int:
    """Remove entries whose id (hash prefix) starts with ``key_id``; returns how many were removed."""
    if len(key_id) < 6:
        raise ValueError("give at least 6 characters of the key id")
    path = Path(path) if path else default_key_file()
    if path.suffix == ".toml":
        raise ValueError("keys are revoked in JSON key files; edit the TOML file, or convert it to keys.json")
    entries = read_key_file(path)
    keep = [e for e in entries if not e.id.startswith(key_id)]
    _write_private(path, {"keys": [entry_doc(e) for e in keep]})
    return len(entries) - len(keep)

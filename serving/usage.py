"""One rate limit per key across workers and replicas: each worker's buckets also pay for the others' requests.

Every worker holds its keys' token buckets in memory (:class:`serving.auth.RateLimiter`). Before a rate-limited
key is checked, :class:`SharedUsage` reads the requests that other workers and replicas recorded in the shared
audit store since it last looked (one query of the two highest seqs when nothing is new) and charges each to its
key's bucket at the time it was made: scoring requests are their score rows, every other accepted request is a
``key_requests`` row (:meth:`SharedUsage.record`). A worker's own requests are marked as it writes them, so they
are not charged twice. Requests in flight in two processes at the same moment do not see each other: the
overshoot is at most one request per process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from serving.audit import AuditStore, SeqCursor
from serving.auth import Caller, KeyStore, RateLimiter

log = logging.getLogger("riskscore.serving.usage")


class SharedUsage:
    """Charges a :class:`RateLimiter` with the requests other processes recorded in ``audit``."""

    def __init__(self, audit: AuditStore, limiter: RateLimiter, keys: Callable[[], KeyStore]):
        self.audit, self.limiter, self.keys = audit, limiter, keys
        score_head, other_head = audit.usage_heads()  # requests before this worker started are not charged
        self.scored, self.other = SeqCursor(start=score_head), SeqCursor(start=other_head)
        self._following = threading.Lock()  # one reader at a time: a row read twice would be charged twice

    def written(self, seqs: list[int]) -> None:
        """This worker wrote these score rows: its buckets paid for them when it authorised the request."""
        self.scored.written(seqs)

    def take(self, caller: Caller) -> None:
        """Take one token of ``caller``'s bucket (:class:`serving.auth.AuthError` 429 past the limit), first
        charging what other processes recorded if the key is rate limited."""
        if self.limiter.limited(caller):
            self.follow()
        self.limiter.take(caller)

    def record(self, caller: Caller, request_id: str, method: str, path: str) -> None:
        """Record an accepted request of a route other than scoring, for the other processes' buckets (and as
        the trail of who read or changed what)."""
        self.other.written([self.audit.record_key_request(caller.key_id, caller.agency, request_id, method, path)])

    def follow(self) -> int:
        """Charge the requests recorded elsewhere since the last call; returns how many were charged.

        An unreachable store is logged and skipped (the request's own work will report it)."""
        with self._following:
            return self._follow()

    def _follow(self) -> int:
        try:
            score_head, other_head = self.audit.usage_heads()
            if not (self.scored.behind(score_head) or self.other.behind(other_head)):
                return 0
            made, score_seqs, other_seqs = self.audit.requests_after(self.scored, self.other)
        except Exception:
            log.warning("could not read the requests of other workers for the rate limits", exc_info=True)
            return 0
        keys = self.keys()
        charged = 0
        for key_id, at in made:
            caller = keys.caller(key_id)
            if caller is not None:  # a key removed since then has no bucket to charge
                self.limiter.charge(caller, at)
                charged += 1
        self.scored.mark(score_seqs)
        self.other.mark(other_seqs)
        return charged

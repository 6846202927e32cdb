"""One rate limit per key across workers and replicas: each worker's buckets also pay for the others' requests.

Every worker holds its keys' token buckets in memory (:class:`serving.auth.RateLimiter`). Before a rate-limited
key is checked, :class:`SharedUsage` reads the scoring requests that other workers and replicas recorded in the
shared audit store since it last looked (one query of the highest seq when nothing is new) and charges each to
its key's bucket at the time it was made. A worker's own requests are marked as it writes them, so they are not
charged twice. Requests in flight in two processes at the same moment do not see each other: the overshoot is
at most one request per process. Only scoring requests are recorded, so only they count across processes;
other routes stay limited per worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from serving.audit import AuditStore, SeqCursor
from serving.auth import KeyStore, RateLimiter

log = logging.getLogger("riskscore.serving.usage")


class SharedUsage:
    """Charges a :class:`RateLimiter` with the scoring requests other processes recorded in ``audit``."""

    def __init__(self, audit: AuditStore, limiter: RateLimiter, keys: Callable[[], KeyStore]):
        self.audit, self.limiter, self.keys = audit, limiter, keys
        self.cursor = SeqCursor(start=audit.heads()[0])  # requests before this worker started are not charged

    def written(self, seqs: list[int]) -> None:
        """This worker wrote these score rows: its buckets paid for them when it authorised the request."""
        self.cursor.mark(seqs)

    def follow(self) -> int:
        """Charge the requests recorded elsewhere since the last call; returns how many were charged.

        An unreachable store is logged and skipped (the request's own scoring will report it)."""
        try:
            if not self.cursor.behind(self.audit.heads()[0]):
                return 0
            made, seqs = self.audit.requests_after(self.cursor)
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
        self.cursor.mark(seqs)
        return charged

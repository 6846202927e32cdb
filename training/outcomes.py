"""Reviewer outcomes from the service's audit store, as training input for the next run.

Each outcome recorded through ``POST /outcomes`` (or the review page) gives ``cases`` rows on the scored
event's entities (known from the decision time on) and the scored event itself as a labelled event
(1 = confirmed, 0 = cleared). Every other scored event comes too, unlabelled: the service's entity histories
hold every event it scored, so the next model's training features count them as well. ``riskscore train`` reads
them by default from ``$RISKSCORE_AUDIT_URL`` or
``<RISKSCORE_HOME>/audit.db``; an absent SQLite file means "no outcomes yet".
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sqlalchemy.engine import make_url

from riskscore import config


@dataclass
class ReviewerOutcomes:
    cases: pd.DataFrame  # reviewer cases
    events: pd.DataFrame  # every scored event; the label where a reviewer decided it

    @property
    def labelled(self) -> int:
        return int(self.events["label_known_at"].notna().sum()) if "label_known_at" in self.events else 0


def audit_store_exists(url: str) -> bool:
    """False only for a SQLite URL whose file does not exist (other databases are assumed reachable)."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return True
    return bool(parsed.database) and parsed.database != ":memory:" and Path(parsed.database).exists()


def read_reviewer_outcomes(domain: str, url: str | None = None, skip_event_ids: Collection[str] = (),
                           ) -> ReviewerOutcomes | None:
    """Cases of ``domain`` decided by reviewers and the scored events, labelled where decided (the first decision
    on each event; none of ``skip_event_ids``, the events of the data, which keep the data's label), or ``None``
    without an audit store."""
    url = url or config.audit_url()
    if not audit_store_exists(url):
        return None
    from serving.audit import AuditStore

    store = AuditStore(url)
    try:
        return ReviewerOutcomes(cases=store.export_cases(domain, skip_event_ids),
                                events=store.export_scored_events(domain, skip_event_ids))
    finally:
        store.close()

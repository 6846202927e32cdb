"""The audit store on a real PostgreSQL server: the option replicas on several machines share.

A throw-away server is started for the module (:mod:`tests.postgres_server`); without PostgreSQL's server binaries
or the psycopg driver the tests skip with the reason, unless ``CI`` is set, where they fail (``scripts/test.sh``
installs both).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving import auth, local_server
from tests import postgres_server, test_service
from tests.test_reliability import _audit_rows, accepted_across_replicas, count_across_replicas, scored_once
from tests.test_service import Server, launch, server_test, wait_ready

server = test_service.server  # the module-scoped fixture: its registry, keys and data (its own server is unused)


@pytest.fixture(scope="module")
def pg_url():
    try:
        with postgres_server.running(local_server.free_port()) as url:
            yield url
    except postgres_server.Unavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required under CI: {err}")
        pytest.skip(str(err))


@pytest.fixture
def store(pg_url):
    import sqlalchemy as sa

    from serving.audit import AuditStore, metadata

    store = AuditStore(pg_url)
    try:
        yield store
    finally:
        with store.engine.begin() as conn:  # a clean store per test
            for table in reversed(metadata.sorted_tables):
                conn.execute(sa.text(f"TRUNCATE {table.name} RESTART IDENTITY CASCADE"))
        store.close()


def _write(store, request_id: str, domain: str = "finance", conn=None) -> list[int]:
    from serving.audit import requests, scores

    request, rows = _audit_rows(request_id)
    request["domain"] = domain
    rows[0].update(domain=domain, input_json={"transaction_id": request_id})
    if conn is None:
        return store.record_scores(request, rows, response={})
    conn.execute(requests.insert(), [{**request, "response_json": {}}])
    return list(conn.execute(scores.insert().returning(scores.c.seq), rows).scalars())


def test_replay_reads_a_row_committed_after_a_later_one(store):
    """PostgreSQL hands out seqs at insert, not at commit: a transaction holding seq 2 commits after seq 3. The
    reader that saw 3 keeps seq 2 as a hole and reads it once it commits."""
    from serving.audit import SeqCursor

    cursor, outcomes = SeqCursor(), SeqCursor()
    assert _write(store, "r1") == [1]
    slow = store.engine.connect()
    tx = slow.begin()
    try:
        assert _write(store, "late", conn=slow) == [2]  # not committed yet
        assert _write(store, "r3") == [3]
        first = store.replay("finance", cursor, outcomes)
        assert [r["transaction_id"] for r in first.event_rows] == ["r1", "r3"] and first.score_seqs == [1, 3]
        cursor.mark(first.score_seqs)
        assert set(cursor.gaps) == {2} and cursor.behind(store.heads()[0])
        assert store.replay("finance", cursor, outcomes).event_rows == []  # still in flight
        tx.commit()
    finally:
        slow.close()
    second = store.replay("finance", cursor, outcomes)
    assert [r["transaction_id"] for r in second.event_rows] == ["late"] and second.score_seqs == [2]
    cursor.mark(second.score_seqs)
    assert cursor.gaps == {} and not cursor.behind(store.heads()[0])


def test_rolled_back_insert_leaves_a_hole_that_expires(store):
    from serving import audit

    now = [0.0]
    cursor, outcomes = audit.SeqCursor(clock=lambda: now[0]), audit.SeqCursor()
    with store.engine.connect() as conn:
        tx = conn.begin()
        _write(store, "gone", conn=conn)  # takes seq 1
        tx.rollback()
    assert _write(store, "r2") == [2]
    replay = store.replay("finance", cursor, outcomes)
    cursor.mark(replay.score_seqs)
    assert set(cursor.gaps) == {1}
    now[0] = audit.GAP_WAIT_S + 1
    cursor.mark(store.replay("finance", cursor, outcomes).score_seqs)
    assert cursor.gaps == {} and not cursor.behind(store.heads()[0])


def test_outcomes_reloads_and_cases_on_postgres(store):
    """The rest of the store's writes and reads work on PostgreSQL: outcomes (one per score), cases export,
    reload requests, the review queue."""
    from serving.audit import OutcomeExists, SeqCursor

    _write(store, "r1")
    _write(store, "c2", domain="customs")
    store.record_outcome("s-r1", "confirmed", "checked", "k2", "FIU")
    with pytest.raises(OutcomeExists):
        store.record_outcome("s-r1", "cleared", None, "k2", "FIU")
    assert store.heads() == (2, 1)
    replay = store.replay("finance", SeqCursor(), SeqCursor())
    assert [r.score_id for r in replay.decided] == ["s-r1"] and replay.score_seqs == [1, 2]
    assert store.last_reload_seq() == 0
    assert store.request_reload(["finance"], True, "admin1") == 1
    assert [(r.domains, r.force) for r in store.reloads_after(0)] == [(["finance"], True)]
    page = store.review_queue(agency="FIU", domain="finance", flagged=None)
    assert page.total == 1 and page.rows[0]["status"] == "confirmed"


@server_test
def test_two_replicas_share_a_postgres_audit_store(server: Server, pg_url, tmp_path):
    """Two service replicas (the second with 2 workers) on one PostgreSQL audit store: each counts the transfers
    scored through the other, the stored scores read back through either, and a key's rate limit holds across
    the three workers, for scoring and for reads."""
    env = {**server.env, "RISKSCORE_AUDIT_URL": pg_url, "RISKSCORE_DOMAINS": "finance"}
    keys_file = Path(server.env["RISKSCORE_KEYS_FILE"])
    limited, reader = (auth.add_key(role, agency, keys_file, rate=0.01, burst=4)[0]
                       for role, agency in (("financial", "L"), ("reviewer", "A")))
    procs, urls = [], []
    try:
        for workers in (1, 2):
            port, log = local_server.free_port(), tmp_path / f"replica-{workers}.log"
            procs.append(launch({**env, "RISKSCORE_WORKERS": str(workers)}, log, port))
            urls.append(f"http://127.0.0.1:{port}")
            wait_ready(urls[-1], procs[-1], log)
        template = count_across_replicas(server, [urls[0], urls[1], urls[1], urls[0], urls[1]])
        assert accepted_across_replicas(urls, limited, template, 10) == 4
        read = scored_once(urls[1], server, template)
        assert accepted_across_replicas(urls, reader, template, 10, read=read) == 4
    finally:
        for proc in procs:
            local_server.stop(proc)

"""Service start-up: the scored events of the audit store on top of the data history, in a scorer's online state.

A scorer starts from its history (the data files) and every event the service scored (the audit store,
:meth:`serving.audit.AuditStore.replay`), so its start-up grows with the audit history. This generates
``--events`` synthetic finance transfers, takes the first half as the data history and writes the second half into
a fresh SQLite audit store as the service records them (validated items, 1,000 per request). Then, in the same
run: reading the store; seeding the history (``FeatureSet.online``, the baseline per event); and adding the replayed
events onto it (:meth:`serving.scorer.DomainScorer.apply_replay`, as the service starts). Seeding both together
in one bulk load was tried: about a third less time per replayed event, but its running sums are not bit-identical
to the ones a live service built event by event, so a restarted service would not compute exactly the same
features. Last, a pickled snapshot of the resulting state is written and read back: what a start-up would load
instead of seeding and replaying.

    python -m bench.replay [--events 200000] [--json out.json]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import api_items, dataset, events_and_cases, machine, write_json

BATCH = 1000


def fill(store, items: list[dict]) -> None:
    """Record ``items`` (validated, as ``model_dump(mode="json")``) as scoring requests of ``BATCH`` items."""
    from serving.audit import utcnow

    contributions = {f"feature_{i}": 0.01 * i for i in range(81)}
    for start in range(0, len(items), BATCH):
        request_id, now = uuid.uuid4().hex, utcnow()
        rows = [{"score_id": str(uuid.uuid4()), "request_id": request_id, "item_index": i, "created_at": now,
                 "domain": "finance", "event_id": item["transaction_id"], "caller_key_id": "k1", "agency": "FIU",
                 "model_name": "riskscore-finance", "model_version": "1", "input_json": item,
                 "features_json": contributions, "score": 0.1, "band": "low", "flagged": False, "threshold": 0.5,
                 "explanation_json": {"contributions": contributions}}
                for i, item in enumerate(items[start:start + BATCH])]
        store.record_scores({"request_id": request_id, "created_at": now, "domain": "finance", "caller_key_id": "k1",
                             "agency": "FIU", "idempotency_key": None, "body_sha256": "0" * 64, "items": len(rows)},
                            rows, {})


def snapshot(online) -> dict[str, float]:
    """A pickled snapshot of the online state (what a start-up could load instead of seeding and replaying):
    seconds to write and to read it back, and its size."""
    started = time.perf_counter()
    blob = pickle.dumps(online.executors, protocol=pickle.HIGHEST_PROTOCOL)
    dump_s = time.perf_counter() - started
    started = time.perf_counter()
    pickle.loads(blob)
    return {"snapshot_write_s": dump_s, "snapshot_read_s": time.perf_counter() - started,
            "snapshot_mb": len(blob) / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from features.domains import feature_set
    from serving.audit import AuditStore
    from serving.models import parse_batch
    from serving.scorer import DomainScorer

    fs = feature_set("finance")
    out: dict = {"machine": machine(), "events": args.events}
    with tempfile.TemporaryDirectory(prefix="riskscore-replay-") as tmp:
        root = Path(tmp)
        events, _ = events_and_cases("finance", dataset("finance", args.events, root))
        half = len(events) // 2
        history, scored = events.iloc[:half], events.iloc[half:]
        items = [item.model_dump(mode="json") for start in range(0, len(scored), BATCH)
                 for item in parse_batch("finance", {"items": api_items("finance", scored.iloc[start:start + BATCH])})]
        store = AuditStore(f"sqlite:///{root / 'audit.db'}")
        started = time.perf_counter()
        fill(store, items)
        out["write_s"] = time.perf_counter() - started

        started = time.perf_counter()
        replay = store.replay("finance")
        out["read_s"] = time.perf_counter() - started
        store.close()

        started = time.perf_counter()
        state = fs.online(history)  # with its labels, as the data files seed it
        out["seed_history_s"] = time.perf_counter() - started
        scorer = DomainScorer("finance", None, "riskscore-finance", "1", state)
        scorer.history_ids = set(history["transaction_id"].astype(str))
        started = time.perf_counter()
        scorer.apply_replay(replay)
        out["replay_onto_history_s"] = time.perf_counter() - started
        if scorer.online.events_seen != len(events):
            raise SystemExit(f"the state holds {scorer.online.events_seen} events, expected {len(events)}")
        out.update(snapshot(scorer.online))
    out["history_events"], out["scored_events"] = half, len(items)
    per = {k: 1e6 * out[k] / n for k, n in (("seed_history_s", half), ("replay_onto_history_s", len(items)))}
    out["seed_us_per_event"], out["replay_us_per_event"] = per["seed_history_s"], per["replay_onto_history_s"]
    out["replay_vs_seed_per_event"] = out["replay_us_per_event"] / out["seed_us_per_event"]
    print(f"history {half:,} events: seeded in {out['seed_history_s']:.1f} s ({out['seed_us_per_event']:.0f} us "
          f"per event); {len(items):,} scored events read in {out['read_s']:.1f} s, then added onto the history in "
          f"{out['replay_onto_history_s']:.1f} s ({out['replay_us_per_event']:.0f} us per event, "
          f"{out['replay_vs_seed_per_event']:.2f} x seeding); a pickled snapshot of the whole state "
          f"({out['snapshot_mb']:.0f} MB) takes {out['snapshot_write_s']:.1f} s to write and "
          f"{out['snapshot_read_s']:.1f} s to read")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

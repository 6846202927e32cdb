"""Service start-up: replaying scored events from the audit store into a scorer's online state.

A scorer starts from its history (the data files) and then replays every event the service scored, from the
audit store (:meth:`serving.audit.AuditStore.replay`, :meth:`serving.scorer.DomainScorer.apply_replay`), so its
start-up grows with the audit history. This writes ``--events`` synthetic finance transfers into a fresh SQLite
audit store as the service records them (validated items, 1,000 per request), then times the replay: reading
the rows, and ingesting them into an empty state. The baseline is seeding the same events from a frame
(``FeatureSet.online``, what the data files cost at start-up), measured in the same run.

    python -m bench.replay [--events 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
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
        items = [item.model_dump(mode="json") for start in range(0, len(events), BATCH)
                 for item in parse_batch("finance", {"items": api_items("finance", events.iloc[start:start + BATCH])})]
        store = AuditStore(f"sqlite:///{root / 'audit.db'}")
        started = time.perf_counter()
        fill(store, items)
        out["write_s"] = time.perf_counter() - started

        started = time.perf_counter()
        seeded = fs.online(events.drop(columns=["is_laundering"]))
        out["seed_from_frame_s"] = time.perf_counter() - started
        del seeded

        started = time.perf_counter()
        replay = store.replay("finance")
        out["replay_read_s"] = time.perf_counter() - started
        scorer = DomainScorer("finance", None, "riskscore-finance", "1", fs.online())
        started = time.perf_counter()
        scorer.apply_replay(replay)
        out["replay_apply_s"] = time.perf_counter() - started
        store.close()
        if scorer.online.events_seen != len(items):
            raise SystemExit(f"replayed {scorer.online.events_seen} events, expected {len(items)}")
    total = out["replay_read_s"] + out["replay_apply_s"]
    out["replay_us_per_event"] = 1e6 * total / args.events
    out["replay_vs_seed"] = total / out["seed_from_frame_s"]
    print(f"{args.events:,} scored events: replay {total:.1f} s (read {out['replay_read_s']:.1f} s, ingest "
          f"{out['replay_apply_s']:.1f} s; {out['replay_us_per_event']:.0f} us per event), seeding the same events "
          f"from a frame {out['seed_from_frame_s']:.1f} s: ratio {out['replay_vs_seed']:.2f}")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

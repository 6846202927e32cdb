"""The quick benchmark as a regression guard: the serving path is correct (batch-build parity, same explanations
as ``ModelBundle.explain``) and not grossly slower than raw LightGBM predict + pred_contrib in the same run."""

from __future__ import annotations

import json


def test_quick_bench_guards_against_gross_regressions(tmp_path):
    from bench import quick

    out = tmp_path / "quick.json"
    code = quick.main(["--items", "120", "--idle-ms", "1", "--work", str(tmp_path), "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, report["failures"]
    for r in report["results"]:
        assert r["features_match_batch_build"] and r["explain_matches"], r
        assert r["batch_ratio"] >= 0.05, r
        assert r["single_after_sleep_p50_ms"] > 0 and r["single_after_busy_p50_ms"] > 0, r

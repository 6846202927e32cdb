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


def test_single_row_bench_compares_equal_contributions(tmp_path):
    """bench.single_row checks that LightGBM's single-row fast C API gives predict's contributions before timing."""
    from bench import single_row

    out = tmp_path / "single.json"
    assert single_row.main(["--rows", "3000", "--items", "60", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["predict"]["n"] == report["fast"]["n"] == 60 and report["trees"] >= 1
    assert report["fast_over_predict_p50"] > 0

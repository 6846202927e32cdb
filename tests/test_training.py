"""Training pipeline end to end on small synthetic data: tracking, registry rule, reproducibility, guards."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from features.synthetic import generate
from training.calibrate import sigmoid
from training.cli import evaluate_cmd, promote_cmd, train_cmd
from training.lgbm import LGBMConfig
from training.metrics import top_k
from training.pipeline import TrainConfig, load_config, train
from training.registry import NoChampionError, load_champion, promote
from training.split import time_split

FIXTURES = Path(__file__).parent / "fixtures"
NAME = "riskscore-customs"
# Unbounded depth (the production default is depth 6 for cheap TreeSHAP): on this 4,000-row fixture the
# 400-row calibration window is small, and the deeper model's weighted margins give the calibration test a
# clear miscalibration to correct.
FAST = LGBMConfig(learning_rate=0.1, num_leaves=31, max_depth=-1, max_bin=255, num_boost_round=300,
                  early_stopping_rounds=30, imbalance="scale_pos_weight")
CONFIG = TrainConfig(seed=0, num_threads=2, shap_sample=200, quiet=True, lgbm=FAST)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A private MLflow sqlite store + artifact root for this module."""
    home = tmp_path_factory.mktemp("riskscore_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RISKSCORE_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
        mp.setenv("RISKSCORE_ARTIFACT_ROOT", (home / "artifacts").as_uri())
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.delenv("RISKSCORE_MODEL_CUSTOMS", raising=False)
        yield home


@pytest.fixture(scope="module")
def customs_dir(tmp_path_factory) -> Path:
    return generate("customs", 4000, seed=3, out_dir=tmp_path_factory.mktemp("customs"), positive_rate=0.1,
                    progress=False)


@pytest.fixture(scope="module")
def first(store, customs_dir):
    return train("customs", customs_dir, config=CONFIG)


@pytest.fixture(scope="module")
def second(first, customs_dir):
    return train("customs", customs_dir, config=CONFIG)


@pytest.fixture(scope="module")
def worse(second, customs_dir):
    return train("customs", customs_dir, config=replace(CONFIG, lgbm=replace(FAST, num_boost_round=1)))


def client() -> MlflowClient:
    return MlflowClient()


# ---------------------------------------------------------------------------------------------- split


def test_time_split_never_splits_a_timestamp():
    days = [f"2024-01-0{d}" for d, n in zip(range(1, 6), (3, 4, 3, 4, 6), strict=True) for _ in range(n)]
    shuffled = pd.Series(pd.to_datetime(days)).sample(frac=1.0, random_state=1).reset_index(drop=True)
    sp = time_split(shuffled, fractions=(0.3, 0.2, 0.2, 0.3))  # cut positions 6, 10, 14 fall inside days 2, 4, 5
    assert sp.sizes() == {"train": 3, "validation": 7, "calibration": 4, "test": 6}
    seen: dict = {}
    for name, pos in sp.windows.items():
        for t in shuffled.iloc[pos]:
            assert seen.setdefault(t, name) == name, f"{t} is in two windows"
    with pytest.raises(ValueError, match="empty"):
        time_split(pd.Series(pd.to_datetime(["2024-01-01"] * 10)))


def test_time_split_by_dates_is_ordered():
    times = pd.Series(pd.date_range("2024-01-01", periods=100, freq="D"))
    sp = time_split(times, dates=["2024-02-01", "2024-03-01", "2024-03-15"])
    assert sp.sizes() == {"train": 31, "validation": 29, "calibration": 14, "test": 26}
    assert sp.ranges["validation"][0] == pd.Timestamp("2024-02-01")
    assert max(sp["train"]) < min(sp["validation"]) < min(sp["test"])


def test_load_config_from_toml(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('domain = "customs"\ncapacity = 0.02\ntarget-precision = 0.9\n[lgbm]\nnum_leaves = 15\n')
    cfg = load_config(path, seed=7, capacity=None)
    assert (cfg.capacity, cfg.target_precision, cfg.seed, cfg.lgbm.num_leaves) == (0.02, 0.9, 7, 15)
    path.write_text("nonsense = 1\n")
    with pytest.raises(ValueError, match="nonsense"):
        load_config(path)


# ---------------------------------------------------------------------------------------------- tracking


def test_first_run_is_tracked_and_becomes_champion(first):
    run = client().get_run(first.run_id)
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    for key in ("test_pr_auc", "test_roc_auc", "test_precision_at_1pct", "test_precision_at_5pct",
                "test_recall_at_10pct", "test_brier", "test_revenue_share_at_5pct", "validation_pr_auc",
                "baseline_test_pr_auc", "lgbm_raw_test_pr_auc", "brier_calibrated", "brier_uncalibrated",
                "threshold", "promoted", "promotion_challenger_pr_auc"):
        assert key in metrics, key
    assert any(k.startswith("test_recall_") and "undervaluation" in k for k in metrics)  # per-typology recall
    assert params["seed"] == "0" and params["capacity"] == "0.05" and "chosen.num_leaves" in params
    assert len(tags["data_fingerprint"]) == 64 and tags["git_commit"]
    assert tags["feature_set_version"] == first.fs.version
    for window in ("train", "validation", "calibration", "test"):
        assert int(tags[f"rows_{window}"]) == len(first.split[window]) > 0
        assert " .. " in tags[f"window_{window}"]
    assert tags["promotion_decision"] == "promoted"
    report = {Path(a.path).name for a in client().list_artifacts(first.run_id, "report")}
    assert {"features.md", "shap_summary.png", "shap_importance.csv", "pr_curve.png", "calibration.png",
            "confusion_matrix.png", "model_card.md"} <= report
    info = mlflow.models.get_model_info(f"models:/{NAME}/{first.model_version}")
    assert info.signature is not None and info.saved_input_example_info is not None
    mv = client().get_model_version(NAME, first.model_version)
    assert {"champion", "challenger"} <= set(mv.aliases)
    assert mv.tags["promotion_decision"] == "promoted"


def test_logged_pyfunc_scores_like_the_bundle_without_pickles(first, tmp_path):
    uri = f"models:/{NAME}/{first.model_version}"
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".joblib")]
    model = mlflow.pyfunc.load_model(uri)
    X, _ = first.window("test")
    from training.pyfunc import signature_frame

    sample = signature_frame(X[first.bundle.feature_names].head(50), list(first.bundle.categorical))
    out = model.predict(sample)
    np.testing.assert_allclose(out["score"].to_numpy(), first.bundle.predict(sample), atol=1e-12)
    assert set(out["band"]) <= set(first.bundle.bands) | {"low"}
    # the logged model carries the code it imports: it loads and scores where this project is not installed
    sample.to_parquet(tmp_path / "sample.parquet")
    repo = str(Path(__file__).resolve().parents[1])
    script = "\n".join([
        "import sys, importlib.util",
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]",
        f"sys.path[:] = [p for p in sys.path if p not in ('', {repo!r})]",
        "assert importlib.util.find_spec('training') is None, 'the project is still importable'",
        "import json, mlflow.pyfunc, pandas as pd",
        f"model = mlflow.pyfunc.load_model({str(local)!r})",
        "print(json.dumps(model.predict(pd.read_parquet('sample.parquet'))['score'].tolist()))",
    ])
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(scores, out["score"].to_numpy(), atol=1e-12)


def test_bands_hold_their_shares_of_the_calibration_window(first):
    """high = the threshold (top 5%), medium + high at most the top 20%: isotonic ties never inflate a band."""
    bands, cal = first.bundle.bands, first.models["full"].scores["calibration"]
    assert bands["low"] == 0.0 and bands["high"] == first.bundle.threshold
    assert (cal >= bands.get("medium", bands["high"])).sum() <= top_k(len(cal), 0.20)


def test_the_next_window_is_not_drifted_against_the_reference(first):
    """The drift reference is the calibration window, out of sample for the trees and after the entity histories
    have grown: the test window right after it raises fewer alarms than against the training window."""
    from training.drift import drift_report, reference_profile
    from training.pipeline import chunked

    ref = first.bundle.reference
    assert ref["window"] == "calibration" and ref["rows"] == len(first.split["calibration"])
    rows = {w: first.features.iloc[first.split[w]][first.fs.names] for w in ("train", "test")}
    in_sample = first.models["full"].calibrator(chunked(first.lgbm.raw_margin, rows["train"]))
    train_ref = reference_profile(rows["train"], in_sample, first.fs.categorical, window="train")

    def alarms(profile) -> tuple[float, int]:
        report = drift_report(profile, rows["test"], first.models["full"].scores["test"])
        return report.loc[report["name"] == "score", "psi"].iloc[0], int((report["status"] == "retrain").sum())

    (score_psi, n), (_, n_train) = alarms(ref), alarms(train_ref)
    assert score_psi < 0.1 and n < n_train


def test_calibration_beats_sigmoid_of_raw_margin(first):
    _, y = first.window("test")
    full = first.models["full"]
    brier_raw = np.mean((sigmoid(full.margins["test"]) - y) ** 2)
    brier_cal = np.mean((full.scores["test"] - y) ** 2)
    assert brier_cal < brier_raw
    assert first.bundle.metrics["brier_calibrated"] == pytest.approx(brier_cal)


def test_load_champion_round_trip(first):
    bundle, mv = load_champion("customs")
    assert str(mv.version) == first.model_version
    X, _ = first.window("test")
    np.testing.assert_allclose(bundle.predict(X), first.bundle.predict(X), rtol=0, atol=1e-12)
    assert bundle.threshold == first.bundle.threshold and bundle.bands == first.bundle.bands
    assert bundle.explain(X.head(2))[0].reasons


def test_no_champion_is_a_clear_error(store, monkeypatch):
    monkeypatch.setenv("RISKSCORE_MODEL_FINANCE", "riskscore-finance-empty")
    with pytest.raises(NoChampionError, match="no champion"):
        load_champion("finance")


# ---------------------------------------------------------------------------------------------- registry rule


def test_identical_rerun_is_reproducible_and_stays_challenger(first, second):
    assert second.fingerprint == first.fingerprint
    assert second.metrics == first.metrics
    assert second.model_version != first.model_version
    assert second.promotion["decision"] == "challenger"
    assert str(client().get_model_version_by_alias(NAME, "champion").version) == first.model_version
    assert str(client().get_model_version_by_alias(NAME, "challenger").version) == second.model_version


def test_worse_model_is_not_promoted(worse, first):
    assert worse.lgbm.best_iteration == 1
    p = worse.promotion
    assert p["decision"] == "challenger" and p["champion_version"] == first.model_version
    assert p["challenger"]["pr_auc"] < p["champion"]["pr_auc"]
    mv = client().get_model_version(NAME, worse.model_version)
    assert mv.tags["promotion_decision"] == "challenger"
    assert float(mv.tags["champion_pr_auc"]) == pytest.approx(p["champion"]["pr_auc"], abs=1e-6)
    run = client().get_run(worse.run_id)
    assert run.data.tags["promotion_decision"] == "challenger" and run.data.metrics["promoted"] == 0.0
    assert "promotion_champion_pr_auc" in run.data.metrics
    assert str(client().get_model_version_by_alias(NAME, "champion").version) == first.model_version


def test_manual_promote_records_reason(worse, first):
    mv = promote("customs", worse.model_version, "incident 42: roll forward", by="tester")
    assert mv.tags["promoted_by"] == "tester" and mv.tags["promotion_reason"] == "incident 42: roll forward"
    assert mv.tags["previous_champion"] == first.model_version and mv.tags["promotion_time"]
    assert str(client().get_model_version_by_alias(NAME, "champion").version) == worse.model_version
    out = CliRunner().invoke(promote_cmd, ["--domain", "customs", "--version", first.model_version,
                                           "--reason", "roll back", "--by", "tester"])
    assert out.exit_code == 0, out.output
    assert str(client().get_model_version_by_alias(NAME, "champion").version) == first.model_version
    bad = CliRunner().invoke(promote_cmd, ["--domain", "customs", "--version", "999", "--reason", "x"])
    assert bad.exit_code != 0 and "no version 999" in bad.output


def test_evaluate_command_prints_metrics(first, customs_dir):
    out = CliRunner().invoke(evaluate_cmd, ["--domain", "customs", "--data", str(customs_dir)])
    assert out.exit_code == 0, out.output
    for text in ("PR-AUC", "ROC-AUC", "1%", "2%", "5%", "10%", "revenue", "by typology: ", "undervaluation"):
        assert text in out.output
    # the model's own training data: the output says how much of it is in-sample
    fitted = sum(len(first.split[w]) for w in ("train", "validation", "calibration"))
    assert f"warning: {fitted:,} of {len(first.split['test']) + fitted:,} labelled events" in out.output, out.output


# ---------------------------------------------------------------------------------------------- guards, other inputs


def test_shuffled_labels_give_chance_auc(store, tmp_path):
    # 12k rows at 30% positives: ~540 positives / 1260 negatives per 15% window, so the null ROC-AUC has
    # sd sqrt((n1 + n0 + 1) / (12 n1 n0)) ~ 0.015 and +-0.05 is ~3.4 sd (the run is seeded: no flakiness)
    data = generate("customs", 12_000, seed=11, out_dir=tmp_path / "big", positive_rate=0.3, progress=False)
    cfg = replace(CONFIG, shuffle_labels=True, track=False)
    result = train("customs", data, config=cfg)
    for window in ("validation", "test"):
        assert abs(result.metrics["full"][window]["roc_auc"] - 0.5) < 0.05, window


def test_shuffled_label_run_is_tracked_but_never_registered(store, customs_dir, monkeypatch):
    """The shuffled-label check is tracked (its chance metrics are the evidence) but registers nothing: with an
    empty registry its random model became the first champion of the domain."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("RISKSCORE_MODEL_CUSTOMS", "riskscore-customs-shuffled")
    result = train("customs", customs_dir, config=replace(CONFIG, shuffle_labels=True))
    assert result.run_id and result.model_version is None and result.promotion is None
    client = MlflowClient()
    assert client.get_run(result.run_id).data.tags["shuffled_labels"] == "true"
    assert not client.search_registered_models("name = 'riskscore-customs-shuffled'")


def test_shuffled_labels_leave_no_case_with_a_true_outcome(customs_dir):
    """Every case of the shuffled run comes from the shuffled labels: a reviewer's or a case file's case carries
    the true outcome of its entities, and kept, it let the true labels back into the features."""
    from features.datasets import empty_cases, load_dataset
    from training.pipeline import TrainData, shuffle_labels

    loaded = load_dataset("customs", customs_dir, 7.0)
    events = loaded.declarations
    reviewer = pd.DataFrame([{
        "case_id": "s1:importer_id", "entity_kind": "importer", "entity_id": str(events["importer_id"].iloc[0]),
        "opened_at": events["date"].iloc[0], "closed_at": events["date"].iloc[0], "outcome": "confirmed",
        "source": "reviewer", "note": None}]).astype(empty_cases().dtypes.to_dict())
    data = TrainData(events=events, cases=pd.concat([loaded.cases, reviewer], ignore_index=True), accounts=None,
                     from_eval=np.zeros(len(events), bool), paths=[])
    shuffled = shuffle_labels("customs", data, "fraud", seed=0, delay=7.0)
    assert set(shuffled.cases["source"].astype(str)) == {"derived"}
    assert not shuffled.events["fraud"].equals(events["fraud"])


def test_finance_account_metrics(store, tmp_path):
    data = generate("finance", 4000, seed=5, out_dir=tmp_path / "fin", positive_rate=0.1, progress=False)
    result = train("finance", data, config=replace(CONFIG, track=False))
    test = result.metrics["full"]["test"]
    for key in ("account_precision_at_k", "account_recall_at_k", "pr_auc", "precision_at_5pct"):
        assert key in test and 0.0 <= test[key] <= 1.0, key
    assert any(k.startswith("recall_") and k not in ("recall_at_threshold",) for k in test)
    assert result.model_version is None and result.run_id is None
    from training.pipeline import evaluate_bundle

    evaluated = evaluate_bundle(result.bundle, "finance", data)  # `riskscore evaluate` reports accounts too
    assert evaluated["account_k"] >= 1 and 0.0 <= evaluated["account_precision_at_k"] <= 1.0


def test_cli_train_with_train_and_eval_files(store, tmp_path):
    raw = pd.read_csv(FIXTURES / "customs_public_sample.csv", dtype=str, keep_default_na=False)
    early = raw["Date"] < "2020-10-01"
    raw[early].to_csv(tmp_path / "train.csv", index=False)
    raw[~early].to_csv(tmp_path / "valid.csv", index=False)
    (tmp_path / "cfg.toml").write_text("num-threads = 1\nquiet = false\nshap_sample = 50\nno_register = true\n"
                                       "[lgbm]\nlearning_rate = 0.1\nmin_child_samples = 10\n")
    out = CliRunner().invoke(train_cmd, ["--domain", "customs", "--train", str(tmp_path / "train.csv"),
                                         "--eval", str(tmp_path / "valid.csv"), "--config", str(tmp_path / "cfg.toml"),
                                         "--seed", "1"])
    assert out.exit_code == 0, out.output
    assert "lgbm_raw" in out.output and "baseline" in out.output and "test window: 2020-10" in out.output
    missing = CliRunner().invoke(train_cmd, ["--domain", "customs"])
    assert missing.exit_code != 0 and "--data" in missing.output


def test_evaluate_looks_back_on_the_training_data_like_the_test_window(store, tmp_path, monkeypatch):
    """`evaluate` on the eval file gives the training run's test metrics: its features look back on the data the
    model was trained and tested on by default (as serving and `score` do); --no-history evaluates the file on its
    own. A file after the eval window looks back on both files, so no months are missing from its history."""
    raw = pd.read_csv(FIXTURES / "customs_public_sample.csv", dtype=str, keep_default_na=False)
    early, later = raw["Date"] < "2020-09-01", raw["Date"] >= "2020-11-01"
    raw[early].to_csv(tmp_path / "train.csv", index=False)
    raw[~early & ~later].to_csv(tmp_path / "valid.csv", index=False)
    raw[later].to_csv(tmp_path / "later.csv", index=False)
    monkeypatch.setenv("RISKSCORE_MODEL_CUSTOMS", "riskscore-customs-history-check")
    cfg = replace(CONFIG, eval_path=str(tmp_path / "valid.csv"), lgbm=replace(FAST, min_child_samples=10))
    result = train("customs", tmp_path / "train.csv", config=cfg)
    test = result.metrics["full"]["test"]
    assert [Path(p).name for p in result.bundle.history_paths()] == ["train.csv", "valid.csv"]

    def evaluated(*extra: str, data: str = "valid.csv") -> tuple[str, float]:
        out = CliRunner().invoke(evaluate_cmd, ["--domain", "customs", "--data", str(tmp_path / data), *extra])
        assert out.exit_code == 0, out.output
        return out.output, float(out.output.split("PR-AUC")[1].split()[0])

    default, pr_auc = evaluated()
    assert f"history: train.csv + valid.csv ({int(early.sum()):,} events)" in default
    assert pr_auc == pytest.approx(test["pr_auc"], abs=1e-4)
    cold, cold_pr_auc = evaluated("--no-history")
    assert "history: none (0 events)" in cold and cold_pr_auc != pytest.approx(pr_auc, abs=1e-4)
    after, after_pr_auc = evaluated(data="later.csv")
    assert f"history: train.csv + valid.csv ({int((~later).sum()):,} events)" in after
    named = evaluated("--history", str(tmp_path / "train.csv"), "--history", str(tmp_path / "valid.csv"),
                      data="later.csv")
    assert named[1] == after_pr_auc
    gap, _ = evaluated("--history", str(tmp_path / "train.csv"), data="later.csv")
    assert f"history: train.csv ({int(early.sum()):,} events)" in gap
    both = CliRunner().invoke(evaluate_cmd, ["--domain", "customs", "--data", str(tmp_path / "valid.csv"),
                                             "--no-history", "--history", str(tmp_path / "train.csv")])
    assert both.exit_code != 0 and "exclude each other" in both.output
    (tmp_path / "valid.csv").rename(tmp_path / "moved.csv")
    gone = CliRunner().invoke(evaluate_cmd, ["--domain", "customs", "--data", str(tmp_path / "later.csv")])
    assert gone.exit_code != 0 and "valid.csv" in gone.output and "--no-history" in gone.output


def test_fitting_windows_end_before_the_evaluation_file():
    """With --eval, labelled events of the other data dated at or after the evaluation file's start (reviewer
    outcomes of events the service scored later) fit nothing: calibration and threshold never come after the test."""
    from features.domains import feature_set
    from training.pipeline import TrainData, make_split

    fs = feature_set("customs")
    times = pd.to_datetime([f"2023-01-{d:02d}" for d in range(1, 21)]
                           + [f"2023-02-{d:02d}" for d in range(1, 11)] + [f"2023-03-{d:02d}" for d in range(1, 6)])
    events = pd.DataFrame({fs.id_col: [f"D{i}" for i in range(len(times))], fs.time_col: times,
                           fs.label_col: pd.array([i % 2 for i in range(len(times))], dtype="Int8")})
    from_eval = np.r_[np.zeros(20, bool), np.ones(10, bool), np.zeros(5, bool)]  # train, eval, later reviewed
    data = TrainData(events=events, cases=pd.DataFrame(), accounts=None, from_eval=from_eval, paths=[], reviewed=5)
    split = make_split(data, fs, TrainConfig(eval_path="valid.csv"))
    test_start = times[split.windows["test"]].min()
    fitted = np.concatenate([split.windows[k] for k in ("train", "validation", "calibration")])
    assert len(fitted) == 20 and times[fitted].max() < test_start
    assert sorted(split.windows["test"]) == list(range(20, 30))


@pytest.mark.parametrize("eval_file", [False, True])
def test_reviewer_labels_fit_but_never_calibrate_or_test(eval_file):
    """Reviewer-labelled events were picked by a model (mostly flagged ones): they fit the train and validation
    windows by time, never calibration or test, and from the calibration window's start on stay history only.
    They used to fall into the latest windows and bias calibration, threshold and the promotion comparison."""
    from features.domains import feature_set
    from training.pipeline import TrainData, make_split

    fs = feature_set("customs")
    days = list(range(1, 41))
    reviewer_days = [3, 26, 32, 39]  # train, validation, calibration and test time (without --eval)
    times = pd.to_datetime("2023-01-01") + pd.to_timedelta(days + reviewer_days, unit="D")
    labels = [i % 2 for i in days] + [1, 1, 1, 1]
    events = pd.DataFrame({fs.id_col: [f"D{i}" for i in range(len(times))], fs.time_col: times,
                           fs.label_col: pd.array(labels, dtype="Int8")})
    from_eval = np.r_[np.zeros(34, bool), np.ones(6, bool) if eval_file else np.zeros(6, bool), np.zeros(4, bool)]
    data = TrainData(events=events, cases=pd.DataFrame(), accounts=None, from_eval=from_eval, paths=[], reviewed=4)
    config = TrainConfig(eval_path="valid.csv", eval_fractions=(0.6, 0.2, 0.2)) if eval_file else TrainConfig()
    split = make_split(data, fs, config)
    reviewer = {40: "train", 41: "validation"}
    for window, pos in split.windows.items():
        assert {int(p) for p in pos if p >= 40} == {p for p, w in reviewer.items() if w == window}, window
        first, last = split.ranges[window]
        assert first == times[pos].min() and last == times[pos].max()
    data_only = make_split(replace(data, events=events.iloc[:40], from_eval=from_eval[:40], reviewed=0), fs, config)
    for window in ("calibration", "test"):  # the data's own windows are cut as without reviewer outcomes
        assert list(split.windows[window]) == list(data_only.windows[window])
    assert split.ranges["validation"][0] < times[41] < split.ranges["calibration"][0]


def test_reviewer_labels_follow_the_split_dates():
    """With --split-dates the windows start at the dates, not at their first event: a reviewer label dated in a
    gap of the data after the calibration date stays history (it fitted validation)."""
    from features.domains import feature_set
    from training.pipeline import TrainData, make_split

    fs = feature_set("customs")
    data_days = [*range(1, 11), *range(16, 21), *range(26, 32)]  # gaps after the validation and calibration dates
    times = pd.to_datetime([f"2023-01-{d:02d}" for d in data_days] + ["2023-01-12", "2023-01-22"])
    events = pd.DataFrame({fs.id_col: [f"D{i}" for i in range(len(times))], fs.time_col: times,
                           fs.label_col: pd.array([i % 2 for i in range(len(times))], dtype="Int8")})
    data = TrainData(events=events, cases=pd.DataFrame(), accounts=None, from_eval=np.zeros(len(times), bool),
                     paths=[], reviewed=2)
    split = make_split(data, fs, TrainConfig(split_dates=("2023-01-11", "2023-01-21", "2023-01-29")))
    n = len(data_days)
    assert n in split.windows["validation"] and n + 1 not in np.concatenate(list(split.windows.values()))
    assert split.ranges["train"][1] == pd.Timestamp("2023-01-10")


def test_warmup_days_are_history_only():
    """--warmup-days: events of the data's first days fit no window (their entities have no history yet) but stay
    in the events, so later features still count them; a warm-up covering every labelled event is refused."""
    from features.domains import feature_set
    from training.pipeline import TrainData, make_split

    fs = feature_set("customs")
    times = pd.to_datetime("2023-01-01") + pd.to_timedelta(range(40), unit="D")
    events = pd.DataFrame({fs.id_col: [f"D{i}" for i in range(40)], fs.time_col: times,
                           fs.label_col: pd.array([i % 2 for i in range(40)], dtype="Int8")})
    data = TrainData(events=events, cases=pd.DataFrame(), accounts=None, from_eval=np.zeros(40, bool), paths=[])
    plain = make_split(data, fs, TrainConfig())
    warm = make_split(data, fs, TrainConfig(warmup_days=10))
    fitted = np.concatenate(list(warm.windows.values()))
    assert sorted(fitted) == list(range(10, 40))  # day 10 is the first after the warm-up
    assert warm.ranges["train"][0] == pd.Timestamp("2023-01-11")
    assert list(warm.windows["test"]) == list(plain.windows["test"][-len(warm.windows["test"]):])
    with pytest.raises(ValueError, match="warm-up of 40 days covers every labelled event"):
        make_split(data, fs, TrainConfig(warmup_days=40))
    with pytest.raises(ValueError, match="warmup_days"):
        TrainConfig(warmup_days=-1)


def test_fitting_windows_hold_only_outcomes_known_before_the_test_window():
    """Finance outcomes arrive 30 days after the transfer: a model deployed when the test window starts could not
    have fitted, calibrated or set its threshold on the last 30 days' labels. They stay history; the fitting
    windows are cut again over the rest. A reviewer label decided after the test start fits nothing either."""
    from features.domains import feature_set
    from features.featureset import LABEL_KNOWN_AT
    from training.pipeline import TrainData, make_split

    fs = feature_set("finance")  # label delay 30 days
    days = list(range(200))
    times = pd.to_datetime("2023-01-01") + pd.to_timedelta([*days, 50, 60], unit="D")
    events = pd.DataFrame({fs.id_col: [f"T{i}" for i in range(len(times))], fs.time_col: times,
                           fs.label_col: pd.array([i % 2 for i in range(len(times))], dtype="Int8")})
    decided = [pd.NaT] * 200 + [pd.Timestamp("2023-03-01"), pd.Timestamp("2023-12-31")]  # before / after test
    events[LABEL_KNOWN_AT] = pd.to_datetime(pd.Series(decided)).astype("datetime64[ns]")
    data = TrainData(events=events, cases=pd.DataFrame(), accounts=None, from_eval=np.zeros(len(times), bool),
                     paths=[], reviewed=2)
    split = make_split(data, fs, TrainConfig())
    test_start = times[split.windows["test"]].min()
    assert test_start == pd.Timestamp("2023-01-01") + pd.Timedelta(days=170)  # the test window as without delay
    fitted = np.concatenate([split.windows[w] for w in ("train", "validation", "calibration")])
    assert times[fitted].max() + pd.Timedelta(days=30) < test_start
    assert split.embargoed == 30  # the data's days 140..169
    assert 200 in fitted and 201 not in fitted  # the reviewer label decided after the test start fits nothing
    sizes = split.sizes()
    assert sizes["calibration"] == 140 - round(0.75 / 0.85 * 140)  # cut again in the configured proportions
    at_once = make_split(data, feature_set("finance", 0.0), TrainConfig())  # outcomes known at the event
    assert at_once.embargoed == 0 and 201 not in np.concatenate(list(at_once.windows.values()))
    with pytest.raises(ValueError, match="outcomes known only after the test window starts"):
        make_split(data, feature_set("finance", 400.0), TrainConfig())


def test_champion_is_compared_only_where_it_is_comparable(first, customs_dir, tmp_path):
    """A challenger whose test window lies inside the champion's training data cannot beat it on in-sample scores:
    it is not compared there (no automatic promotion, the reason says why); nor is a champion whose features
    used another label delay."""
    from features.datasets import load_dataset

    champion = client().get_model_version_by_alias(NAME, "champion").version
    events = load_dataset("customs", customs_dir).declarations
    early = events[events["date"] < events["date"].quantile(0.5)]
    early.to_parquet(tmp_path / "early.parquet")
    inside = train("customs", tmp_path / "early.parquet", config=CONFIG)
    assert inside.promotion["decision"] == "challenger" and inside.promotion["champion"] is None
    assert "fitted on events up to" in inside.promotion["reason"], inside.promotion["reason"]
    barely = events[events["date"] <= pd.Timestamp(first.bundle.fitted_until) + pd.Timedelta(days=3)]
    barely.to_parquet(tmp_path / "barely.parquet")
    few = train("customs", tmp_path / "barely.parquet", config=CONFIG)
    assert few.promotion["decision"] == "challenger" and "too few to compare on" in few.promotion["reason"], \
        few.promotion["reason"]
    delayed = train("customs", customs_dir, config=replace(CONFIG, label_delay_days=5.0))
    assert delayed.promotion["decision"] == "challenger" and "label delay" in delayed.promotion["reason"]
    assert client().get_model_version_by_alias(NAME, "champion").version == champion
    assert first.bundle.fitted_until == max(first.split.ranges[w][1]
                                            for w in ("train", "validation", "calibration")).isoformat()


def test_capacity_and_target_precision_are_shares(first, customs_dir):
    """A capacity or target precision outside (0, 1] is refused (it made a 99% flag rate or an empty queue);
    an unreachable target precision is recorded on the run."""
    for bad in ({"capacity": 2.0}, {"capacity": 0.0}, {"target_precision": 1.5}):
        with pytest.raises(ValueError, match=r"capacity|target precision"):
            replace(CONFIG, **bad)
    for flag in ("--capacity", "--target-precision"):
        out = CliRunner().invoke(train_cmd, ["--domain", "customs", "--data", ".", flag, "2"])
        assert out.exit_code == 2 and flag in out.output
    run = train("customs", customs_dir, config=replace(CONFIG, target_precision=0.999, register=False))
    tags = client().get_run(run.run_id).data.tags
    reached = float(tags["calibration_precision_at_threshold"])
    assert tags["target_precision_reached"] == str(reached >= 0.999).lower()


def _audited_transfer(store, score_id: str, item: dict, at) -> None:
    """One scoring of ``item`` (a finance API item) written to ``store`` as the service writes it."""
    request = {"request_id": f"r-{score_id}", "created_at": at, "domain": "finance", "caller_key_id": "k1",
               "agency": "A", "idempotency_key": None, "body_sha256": "0" * 64, "items": 1}
    store.record_scores(request, [{
        "score_id": score_id, "request_id": f"r-{score_id}", "item_index": 0, "created_at": at, "domain": "finance",
        "event_id": item["transaction_id"], "caller_key_id": "k1", "agency": "A", "model_name": "m",
        "model_version": "1", "input_json": item, "features_json": {}, "score": 0.5, "band": "high",
        "flagged": True, "threshold": 0.1, "explanation_json": {}}], {})


@pytest.mark.parametrize("case", ["scored_twice", "in_the_data"])
def test_one_label_per_event_in_training_and_serving(tmp_path, case):
    """An event has one label, the same in training and in the online state: the first reviewer decision on any
    of its scorings (a second one is refused), and none if the data has the event (the data's label counts).
    Training used to get two rows for an event decided twice and the service a second label for an event of the
    data, so later events' features differed between the two; and it left out the scored events nobody reviewed,
    which the service's histories count."""
    import datetime as dt

    from features.datasets import load_dataset
    from features.domains import feature_set
    from serving.audit import AuditStore, OutcomeExists, outcomes
    from serving.fast_path import feature_columns_in_time_order
    from serving.models import Transfer, item_columns
    from serving.scorer import DomainScorer
    from training.pipeline import load_training_data

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = AuditStore(url)
    first = {"transaction_id": "T-1", "timestamp": "2023-06-25T00:00:00", "source_account": "ACC-A",
             "target_account": "ACC-B", "amount": 9500.0, "currency": "USD", "channel": "wire",
             "source_country": "US", "target_country": "GB"}
    later = {**first, "transaction_id": "T-2", "timestamp": "2023-06-26T00:00:00", "target_account": "ACC-C"}
    scored_at, decided_at = dt.datetime(2023, 6, 25, 1), dt.datetime(2023, 6, 25, 2)
    rows = [{**later, "is_laundering": pd.NA}] + ([{**first, "is_laundering": 0}] if case == "in_the_data" else [])
    pd.DataFrame(rows).to_csv(tmp_path / "data.csv", index=False)
    _audited_transfer(store, "s0", first, scored_at)
    store.record_outcome("s0", "confirmed", None, "k1", "A", decided_at=decided_at)
    unreviewed = {**first, "transaction_id": "T-3", "timestamp": "2023-06-25T12:00:00", "target_account": "ACC-D"}
    _audited_transfer(store, "u0", unreviewed, scored_at)  # in the service's history too, without a label
    if case == "scored_twice":
        _audited_transfer(store, "s1", first, scored_at)
        with pytest.raises(OutcomeExists, match=r"already has an outcome \(on score s0\)"):
            store.record_outcome("s1", "cleared", None, "k1", "A", decided_at=decided_at)
        with pytest.raises(OutcomeExists, match=r"already has an outcome \(recorded by another agency\)$"):
            store.record_outcome("s1", "cleared", None, "k2", "B", decided_at=decided_at)  # never names A's score
        with store.engine.begin() as conn:  # a store written before the refusal: the first decision counts
            conn.execute(outcomes.insert().values(score_id="s1", outcome="cleared", note=None, decided_by="k1",
                                                  agency="A", decided_at=decided_at))
    fs = feature_set("finance", 0.0)
    data = load_dataset("finance", tmp_path / "data.csv", 0.0)
    history = data.transactions[data.transactions["transaction_id"] == "T-1"]
    scorer = DomainScorer("finance", None, "m", "1", fs.online(history, data.cases))
    scorer.history_ids = set(history["transaction_id"].astype(str))
    scorer.apply_replay(store.replay("finance"))
    online = feature_columns_in_time_order(scorer.online, item_columns("finance", [Transfer.model_validate(later)]),
                                           [False])
    train_data = load_training_data("finance", tmp_path / "data.csv", TrainConfig(label_delay_days=0.0,
                                                                                  audit_url=url))
    store.close()
    assert train_data.events["transaction_id"].tolist().count("T-1") == 1
    assert train_data.events.set_index("transaction_id")["is_laundering"].isna()["T-3"]
    batch = fs.build(train_data.events, train_data.cases)
    row = batch[(train_data.events["transaction_id"] == "T-2").to_numpy()].iloc[0]
    label = 1.0 if case == "scored_twice" else 0.0  # the reviewer's first decision; the data's label
    assert row["src_out_labelled"] == 1.0 and row["src_out_label_rate"] == online["src_out_label_rate"][0]
    assert row["src_out_count"] == 2.0  # T-1 and the unreviewed T-3, as the service counts them
    assert float(online["src_out_labelled"][0]) == 1.0
    for name in fs.names:
        if isinstance(row[name], str):
            assert str(online[name][0]) == row[name], name
        else:
            assert float(online[name][0]) == pytest.approx(float(row[name]), nan_ok=True), name
    assert (row["src_out_label_rate"] > 0.3) == (label == 1.0)


def test_rows_written_with_the_standard_json_library_still_read(tmp_path):
    """JSON columns are parsed by orjson, which refuses a lone surrogate escape. An audit store written before the
    service encoded with orjson may hold one (the standard library wrote it); its rows still replay and export."""
    import sqlalchemy as sa

    from serving.audit import AuditStore, scores

    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    item = {"transaction_id": "T-1", "timestamp": "2023-06-25T00:00:00", "source_account": "ACC-A",
            "target_account": "ACC-B", "amount": 9500.0, "currency": "USD", "channel": "wire",
            "source_country": "US", "target_country": "GB"}
    _audited_transfer(store, "s0", item, pd.Timestamp("2023-06-25T01:00:00").to_pydatetime())
    old = json.dumps({**item, "channel": "wire\ud800"})  # what json.dumps wrote: "wire\\ud800"
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {scores.name} SET input_json = :v"), {"v": old})
    assert store.replay("finance").event_rows[0]["channel"] == "wire\ud800"
    assert store.export_scored_events("finance")["channel"].tolist() == ["wire\ud800"]
    store.close()

"""MLflow tracking of a training run: params, metrics, tags, report artifacts and the pyfunc model.

One experiment per domain (``riskscore-<domain>``) whose artifacts go to the configured artifact root. The
model is logged as a pyfunc (:class:`training.pyfunc.RiskModel`) with the bundle directory as its artifact
and registered under :func:`riskscore.config.model_name` unless registration is off.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import lightgbm as lgb
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from sklearn.metrics import confusion_matrix, precision_recall_curve

from riskscore import config as rconfig
from training.calibrate import reliability_plot
from training.pyfunc import BUNDLE_ARTIFACT, predict_frame, signature_frame

if TYPE_CHECKING:
    from training.pipeline import TrainResult

MODEL_ARTIFACT = "model"
REPORT_DIR = "report"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # "models from code": no pickled Python object
PYFUNC_MODULES = ("__init__.py", "bundle.py", "pyfunc.py")  # what the model's code imports: shipped with it


def experiment_name(domain: str) -> str:
    return f"riskscore-{domain}"


def connect() -> MlflowClient:
    """Point MLflow at the configured tracking/registry store and return a client for it."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = rconfig.tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(domain: str) -> str:
    """Id of the domain's experiment, created with the configured artifact root when it does not exist."""
    client = connect()
    name = experiment_name(domain)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    scheme = urlparse(rconfig.tracking_uri()).scheme
    if scheme in ("", "file", "sqlite") or "RISKSCORE_ARTIFACT_ROOT" in os.environ:
        location = f"{rconfig.artifact_root().rstrip('/')}/{name}"
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    """Commit of the code (read-only ``git rev-parse``), or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def metric_key(model: str, window: str, metric: str) -> str:
    """MLflow metric name: ``<window>_<metric>`` for the full model, ``<model>_<window>_<metric>`` otherwise."""
    return f"{window}_{metric}" if model == "full" else f"{model}_{window}_{metric}"


def run_metrics(result: TrainResult) -> dict[str, float]:
    out = {}
    for name, model in result.models.items():
        for window, values in model.metrics.items():
            out.update({metric_key(name, window, k): float(v) for k, v in values.items()})
    out.update({k: float(v) for k, v in result.bundle.metrics.items() if k.startswith("brier_")})
    out["threshold"] = result.bundle.threshold
    out["best_iteration"] = float(result.lgbm.best_iteration)
    out["valid_pr_auc_early_stopping"] = result.lgbm.valid_pr_auc
    out["search_trials_run"] = float(len(result.search_log) - 1)
    out.update({f"time_{k}_s": float(v) for k, v in result.timings.items()})
    return out


def run_params(result: TrainResult) -> dict[str, str]:
    params = {k: str(v) for k, v in result.config.flat().items()}
    params.update({f"chosen.{k}": str(v) for k, v in result.lgbm.params.items() if k != "metric"})
    params.update(domain=result.domain, n_features=str(len(result.bundle.feature_names)),
                  n_raw_features=str(len(result.models["lgbm_raw"].features)))
    return {k: v[:6000] for k, v in params.items()}


def run_tags(result: TrainResult) -> dict[str, str]:
    tags = {
        "domain": result.domain, "git_commit": git_commit(), "data_fingerprint": result.fingerprint,
        "feature_set_version": result.fs.version, "data_paths": ";".join(Path(p).name for p in result.data.paths),
        "label_delay_days": str(result.bundle.label_delay_days), "rows_total": str(len(result.data.events)),
        "shuffled_labels": str(result.config.shuffle_labels).lower(),
        "rows_reviewer_outcomes": str(result.data.reviewed_labels),
        "rows_reviewer_outcomes_fitted": str(int(sum(result.data.reviewer_rows()[result.split[w]].sum()
                                                     for w in ("train", "validation")))),
        "rows_scored_by_service": str(result.data.reviewed),
        "rows_outcome_after_test_start": str(result.split.embargoed),
        "cases_reviewer": str(int((result.data.cases.get("source") == "reviewer").sum())
                              if "source" in result.data.cases else 0),
    }
    if (target := result.config.target_precision) is not None:  # was it reached on the calibration window?
        _, y_cal = result.window("calibration")
        full = result.models["full"]
        reached = float(np.mean(y_cal[full.scores["calibration"] >= full.threshold]))
        tags["calibration_precision_at_threshold"] = f"{reached:.6f}"
        tags["target_precision_reached"] = str(reached >= target).lower()
    for window, (first, last) in result.split.ranges.items():
        tags[f"rows_{window}"] = str(len(result.split[window]))
        tags[f"window_{window}"] = f"{first.isoformat()} .. {last.isoformat()}"
    return tags


# ---------------------------------------------------------------------------------------------- artifacts


def feature_markdown(result: TrainResult) -> str:
    raw = set(result.models["lgbm_raw"].features)
    lines = [f"# Features ({result.fs.version})", "", "| feature | description | type | source |", "|---|---|---|---|"]
    for name in result.fs.names:
        kind = "categorical" if name in result.fs.categorical else "numeric"
        lines.append(f"| `{name}` | {result.fs.labels[name]} | {kind} | {'event' if name in raw else 'history'} |")
    return "\n".join(lines) + "\n"


def shap_artifacts(result: TrainResult, out: Path) -> pd.DataFrame:
    """Global SHAP summary plot and mean-|SHAP| importance on a sample of the test window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import shap

    X, _ = result.window("test")
    n = min(result.config.shap_sample, len(X))
    rng = np.random.default_rng(result.config.seed)
    sample = X.iloc[np.sort(rng.choice(len(X), n, replace=False))]
    matrix = result.bundle.matrix(sample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "output has changed to a list of ndarray"
        values = shap.TreeExplainer(result.bundle.booster).shap_values(matrix)
    values = np.asarray(values[1] if isinstance(values, list) else values)
    if values.ndim == 3:
        values = values[:, :, -1]
    importance = pd.DataFrame({
        "feature": matrix.columns, "label": [result.fs.labels[c] for c in matrix.columns],
        "mean_abs_shap": np.abs(values).mean(axis=0),
    }).sort_values("mean_abs_shap", ascending=False, ignore_index=True)
    importance.to_csv(out / "shap_importance.csv", index=False)
    display = matrix.copy()
    for col in result.bundle.categorical:
        display[col] = display[col].cat.codes.astype(float).where(display[col].notna())
    plt.figure()
    shap.summary_plot(values, display, max_display=20, show=False)
    plt.gcf().savefig(out / "shap_summary.png", dpi=100, bbox_inches="tight")
    plt.close("all")
    return importance


def pr_curve_plot(result: TrainResult, path: Path) -> None:
    y = result.window("test")[1]
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    for name, model in result.models.items():
        p, r, _ = precision_recall_curve(y, model.scores["test"])
        ax.plot(r, p, label=f"{name} (AP {model.metrics['test']['pr_auc']:.3f})")
    ax.axhline(y.mean(), ls="--", color="grey", lw=1, label=f"base rate {y.mean():.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall, test window")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def confusion_artifacts(result: TrainResult, out: Path) -> dict[str, int]:
    y = result.window("test")[1].astype(int)
    flagged = (result.models["full"].scores["test"] >= result.bundle.threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, flagged, labels=[0, 1]).ravel()
    counts = {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}
    (out / "confusion_matrix.json").write_text(json.dumps({**counts, "threshold": result.bundle.threshold}, indent=1))
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    grid = np.array([[tn, fp], [fn, tp]])
    ax.imshow(grid, cmap="Blues")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:,}", ha="center", va="center", color="black")
    ax.set_xticks([0, 1], ["not flagged", "flagged"])
    ax.set_yticks([0, 1], ["negative", "positive"])
    ax.set_title(f"Test window at threshold {result.bundle.threshold:.3f}")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=110)
    return counts


def model_card(result: TrainResult, importance: pd.DataFrame | None) -> str:
    cfg = result.config
    table = result.table.copy()
    head = "| model | " + " | ".join(table.columns) + " |"
    rows = [head, "|" + "---|" * (len(table.columns) + 1)]
    rows += [f"| {name} | " + " | ".join(f"{v:.4f}" for v in row) + " |" for name, row in table.iterrows()]
    windows = [f"- **{w}**: {d}" for w, d in result.split.describe().items()]
    warmup = (f" Events of the first {cfg.warmup_days:g} days are history only (warm-up)." if cfg.warmup_days
              else "")
    if result.split.embargoed:
        warmup += (f" {result.split.embargoed} labelled events before the test window are history only: their "
                   "outcomes were known only after it started.")
    rule = (f"target precision {cfg.target_precision}" if cfg.target_precision is not None
            else f"review capacity top {cfg.capacity:.1%}")
    bands = ", ".join(f"{k} {v:.4f}" for k, v in result.bundle.bands.items())
    top = ""
    if importance is not None:
        top = "\n".join(f"{i + 1}. {r.label} (`{r.feature}`): {r.mean_abs_shap:.4f}"
                        for i, r in importance.head(10).iterrows())
    return f"""# Model card: riskscore {result.domain}

## Model
LightGBM (native categoricals, {result.lgbm.best_iteration} trees, early stopping on the validation window) on
{len(result.bundle.feature_names)} point-in-time features (feature set `{result.fs.version}`), isotonic calibration
of the raw margin fitted on the calibration window only. Decision threshold {result.bundle.threshold:.4f} chosen on
the calibration window for a {rule}; bands (lower edges) {bands}.

## Data
Data: {", ".join(Path(p).name for p in result.data.paths)} (fingerprint `{result.fingerprint[:16]}`), label
`{result.fs.label_col}`, outcome delay {result.bundle.label_delay_days} days.{warmup} Time windows (never random):

{chr(10).join(windows)}

## Test-window metrics
{chr(10).join(rows)}

`baseline` = logistic regression on all features; `lgbm_raw` = LightGBM on the event's own columns only (no
history); `full` = the registered model.

## Most influential features (mean |SHAP|, test sample)
{top}

## Intended use
Ranking {"declarations" if result.domain == "customs" else "transfers"} for human review within a fixed review
capacity, with reason codes. A score is a calibrated probability that review confirms
{"fraud" if result.domain == "customs" else "laundering"}; it is decision support, not an automatic decision.

## Known limitations
- Labels exist only for reviewed events: the model learns what past selection found (selection bias); unreviewed
  traffic is assumed negative.
- Outcomes are assumed known {result.bundle.label_delay_days} days after the event; longer real delays make the
  learned-risk features optimistic.
- Calibration holds for the calibration window's base rate; monitor drift (PSI reference in the bundle) and
  recalibrate when the positive rate moves.
- Trained on {len(result.split['train'])} labelled events; rare entities and new categories fall back to
  population-level behaviour.
"""


def write_artifacts(result: TrainResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "features.md").write_text(feature_markdown(result))
    importance = shap_artifacts(result, out)
    pr_curve_plot(result, out / "pr_curve.png")
    full = result.models["full"]
    y_test = result.window("test")[1]
    reliability_plot(full.margins["test"], y_test, full.calibrator, out / "calibration.png",
                     title="Reliability, test window")
    confusion_artifacts(result, out)
    rows = []
    for name, model in result.models.items():
        for window, values in model.metrics.items():
            rows.append({"model": name, "window": window, **values})
    pd.DataFrame(rows).to_csv(out / "metrics.csv", index=False)
    if len(result.search_log) > 1:
        pd.DataFrame(result.search_log).to_csv(out / "search_trials.csv", index=False)
    (out / "model_card.md").write_text(model_card(result, importance))


def pip_requirements() -> list[str]:
    import sklearn

    return [f"mlflow=={mlflow.__version__}", f"lightgbm=={lgb.__version__}", f"pandas=={pd.__version__}",
            f"numpy=={np.__version__}", f"scikit-learn=={sklearn.__version__}"]


def pyfunc_package(root: Path) -> Path:
    """A ``training`` package holding only the modules the pyfunc imports (:data:`PYFUNC_MODULES`), so the logged
    model loads without this project installed (``mlflow.pyfunc.load_model`` puts it on the path)."""
    package = root / "training"
    package.mkdir(parents=True, exist_ok=True)
    for name in PYFUNC_MODULES:
        shutil.copyfile(Path(__file__).with_name(name), package / name)
    return package


class _WithoutRegistrationLines(io.TextIOBase):
    """A stream that passes everything to ``target`` except MLflow's own registration lines ("Successfully
    registered model ...", "Created version ..."), printed to stderr in the middle of ``train``'s progress bar;
    the run prints its registration with the promotion decision instead."""

    DROP = ("Successfully registered model ", "Created version ", "Registered model ")

    def __init__(self, target):
        self.target = target
        self._dropped = False  # print() writes the newline separately: drop it too

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, text.startswith(self.DROP)
        if not self._dropped and not (dropped and text == "\n"):
            self.target.write(text)
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def log_run(result: TrainResult) -> tuple[str, str | None]:
    """Log the run (params, metrics, tags, artifacts, pyfunc model); returns (run id, registered version)."""
    experiment_id = ensure_experiment(result.domain)
    name = rconfig.model_name(result.domain)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{result.domain}-{result.fingerprint[:8]}") as run:
        mlflow.log_params(run_params(result))
        mlflow.set_tags(run_tags(result))
        mlflow.log_metrics(run_metrics(result))
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / REPORT_DIR
            write_artifacts(result, report)
            mlflow.log_artifacts(str(report), artifact_path=REPORT_DIR)
            bundle_dir = result.bundle.save(Path(tmp) / BUNDLE_ARTIFACT)
            X_test, _ = result.window("test")
            sample = signature_frame(X_test[result.bundle.feature_names].head(200), list(result.bundle.categorical))
            signature = infer_signature(sample, predict_frame(result.bundle, sample))
            with contextlib.redirect_stderr(_WithoutRegistrationLines(sys.stderr)):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT, python_model=str(PYFUNC_CODE), artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
                    code_paths=[str(pyfunc_package(Path(tmp) / "code"))],
                    signature=signature, input_example=sample.head(5),
                    registered_model_name=name if result.config.registers else None,
                    pip_requirements=pip_requirements(),
                )
        version = info.registered_model_version
        return run.info.run_id, (str(version) if version is not None else None)

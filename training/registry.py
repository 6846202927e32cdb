"""Model Registry: challenger / champion aliases, the promotion rule, manual promotion, loading the champion.

Rule: every new version gets the alias ``challenger``. It becomes ``champion`` if there is no champion yet, or
if it beats the current champion on the *same* evaluation window: the champion is re-scored on this run's test
window and the challenger needs a higher PR-AUC and no worse precision at the review capacity. The decision and
both numbers are recorded on the run (tags + metrics) and on the version (tags).
"""

from __future__ import annotations

import getpass
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from riskscore import config as rconfig
from training.bundle import ModelBundle
from training.metrics import capacity_key, precision_recall_at, safe_auc
from training.pyfunc import BUNDLE_ARTIFACT
from training.tracking import connect

if TYPE_CHECKING:
    from training.pipeline import TrainResult

CHAMPION, CHALLENGER = "champion", "challenger"


class NoChampionError(LookupError):
    """The domain has no registered model with the ``champion`` alias."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def get_version(domain: str, version: str | None = None, alias: str | None = None) -> ModelVersion:
    """A registered version of the domain's model by number or alias (default: champion)."""
    client = connect()
    name = rconfig.model_name(domain)
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias or CHAMPION)
    except MlflowException as err:
        what = f"version {version}" if version is not None else f"alias '{alias or CHAMPION}'"
        if version is None and (alias or CHAMPION) == CHAMPION:
            raise NoChampionError(
                f"registered model '{name}' has no champion; train one with `riskscore train --domain {domain}` "
                f"or promote a version with `riskscore promote`") from err
        raise LookupError(f"registered model '{name}' has no {what}") from err


def load_bundle(mv: ModelVersion) -> ModelBundle:
    """Download a registered version's pyfunc model and load its bundle artifact."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=tmp))
        conf = Model.load(str(local / "MLmodel")).flavors["python_function"]
        rel = conf.get("artifacts", {}).get(BUNDLE_ARTIFACT, {}).get("path")
        if rel is None:
            raise ValueError(f"model {mv.name} v{mv.version} has no '{BUNDLE_ARTIFACT}' artifact")
        return ModelBundle.load(local / rel)


def load_model(domain: str, version: str | None = None, alias: str | None = None) -> tuple[ModelBundle, ModelVersion]:
    """Bundle and version info of a version number or alias (default: champion)."""
    mv = get_version(domain, version, alias)
    return load_bundle(mv), mv


def load_champion(domain: str) -> tuple[ModelBundle, ModelVersion]:
    """The champion's bundle (``models:/<name>@champion``) and its version info; ``NoChampionError`` if none."""
    return load_model(domain, alias=CHAMPION)


def _scores(bundle: ModelBundle, features, y: np.ndarray, capacity: float) -> dict[str, float]:
    s = bundle.predict(features)
    _, pr_auc = safe_auc(y, s)
    precision, _ = precision_recall_at(y, s, capacity)
    return {"pr_auc": float(pr_auc), "precision": float(precision)}


def compare(challenger: dict[str, float], champion: dict[str, float]) -> bool:
    """Promotion rule: higher PR-AUC and no worse precision at the review capacity."""
    return challenger["pr_auc"] > champion["pr_auc"] and challenger["precision"] >= champion["precision"]


def _not_comparable(old: ModelBundle, new: ModelBundle) -> str | None:
    """Why the champion cannot be scored on the challenger's test features (None if it can)."""
    if old.feature_set_version != new.feature_set_version:
        return f"uses feature set {old.feature_set_version}, not {new.feature_set_version}"
    if float(old.label_delay_days) != float(new.label_delay_days):
        return f"was trained with a {old.label_delay_days:g}-day label delay, not {new.label_delay_days:g} days"
    return None


def fitted_until(bundle: ModelBundle, mv: ModelVersion) -> pd.Timestamp | None:
    """The latest event time a registered model was fitted on (its bundle, else its run's window tags)."""
    if getattr(bundle, "fitted_until", ""):
        return pd.Timestamp(bundle.fitted_until)
    try:
        tags = connect().get_run(mv.run_id).data.tags if mv.run_id else {}
    except Exception:  # the run is gone: unknown
        return None
    ends = [tags[f"window_{w}"].split(" .. ")[-1] for w in ("train", "validation", "calibration")
            if f"window_{w}" in tags]
    return max(pd.Timestamp(e) for e in ends) if ends else None


MIN_COMPARED_PER_CLASS = 10  # below this many positives (or negatives) PR-AUC and precision are mostly noise


def decide_promotion(result: TrainResult) -> dict:
    """Apply the promotion rule to the run's newly registered version and record the decision."""
    client = connect()
    domain, version, cap = result.domain, str(result.model_version), result.config.capacity
    name = rconfig.model_name(domain)
    client.set_registered_model_alias(name, CHALLENGER, version)
    X_test, y_test = result.window("test")
    challenger = _scores(result.bundle, X_test, y_test, cap)
    try:
        current = get_version(domain, alias=CHAMPION)
    except NoChampionError:
        current = None
    champion: dict[str, float] | None = None
    if current is None:
        promote_it, reason = True, "first model of the domain"
    else:
        old = load_bundle(current)
        # Both models are scored on the test events the champion was not fitted on (a test window inside its
        # training data would give it in-sample scores), with the same features (same definitions and delay).
        times = pd.to_datetime(result.data.events[result.fs.time_col].iloc[result.split["test"]]).to_numpy()
        until = fitted_until(old, current)
        unseen = times > np.datetime64(until) if until is not None else np.ones(len(times), bool)
        why_not = _not_comparable(old, result.bundle)
        positives, negatives = int((y_test[unseen] == 1).sum()), int((y_test[unseen] == 0).sum())
        if why_not is None and min(positives, negatives) < MIN_COMPARED_PER_CLASS:
            why_not = (f"was fitted on events up to {until}, which leaves {positives} positive and {negatives} "
                       f"negative test events after it: too few to compare on (at least {MIN_COMPARED_PER_CLASS} "
                       "of each)")
        if why_not is not None:
            promote_it = False
            reason = f"champion v{current.version} {why_not}: not comparable; promote by hand if intended"
        else:
            if not unseen.all():
                challenger = _scores(result.bundle, X_test[unseen], y_test[unseen], cap)
            champion = _scores(old, X_test[unseen], y_test[unseen], cap)
            promote_it = compare(challenger, champion)
            verdict = "beats" if promote_it else "does not beat"
            where = ("this test window" if unseen.all() else
                     f"the {int(unseen.sum())} of {len(unseen)} test events after the champion's fitted data ({until})")
            reason = (f"{verdict} champion v{current.version} on {where}: PR-AUC {challenger['pr_auc']:.4f} "
                      f"vs {champion['pr_auc']:.4f}, precision@{cap:.0%} {challenger['precision']:.4f} vs "
                      f"{champion['precision']:.4f}")
    decision = "promoted" if promote_it else "challenger"
    if promote_it:
        client.set_registered_model_alias(name, CHAMPION, version)
    key = capacity_key(cap)
    tags = {
        "promotion_decision": decision, "promotion_reason": reason[:5000], "promotion_time": _now(),
        "compared_with_version": str(current.version) if current is not None else "none",
        "challenger_pr_auc": f"{challenger['pr_auc']:.6f}", f"challenger_{key}": f"{challenger['precision']:.6f}",
        "champion_pr_auc": f"{champion['pr_auc']:.6f}" if champion else "none",
        f"champion_{key}": f"{champion['precision']:.6f}" if champion else "none",
        "run_id": result.run_id or "", "data_fingerprint": result.fingerprint,
        "feature_set_version": result.bundle.feature_set_version,
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if result.run_id:
        for k in ("promotion_decision", "promotion_reason", "compared_with_version"):
            client.set_tag(result.run_id, k, tags[k])
        client.set_tag(result.run_id, "model_version", version)
        client.log_metric(result.run_id, "promotion_challenger_pr_auc", challenger["pr_auc"])
        client.log_metric(result.run_id, f"promotion_challenger_{key}", challenger["precision"])
        if champion:
            client.log_metric(result.run_id, "promotion_champion_pr_auc", champion["pr_auc"])
            client.log_metric(result.run_id, f"promotion_champion_{key}", champion["precision"])
        client.log_metric(result.run_id, "promoted", float(promote_it))
    return {"model_name": name, "version": version, "decision": decision, "reason": reason,
            "challenger": challenger, "champion": champion,
            "champion_version": str(current.version) if current is not None else None}


def promote(domain: str, version: str | int, reason: str, by: str | None = None) -> ModelVersion:
    """Manual override: make ``version`` the champion, recording who, why and when on the version."""
    if not reason or not reason.strip():
        raise ValueError("a reason is required to promote by hand")
    client = connect()
    name = rconfig.model_name(domain)
    mv = get_version(domain, version=str(version))
    try:
        previous = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        previous = "none"
    who = by or os.environ.get("RISKSCORE_USER") or _user()
    version = str(mv.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    for k, v in {"promoted_by": who, "promotion_reason": reason.strip()[:5000], "promotion_time": _now(),
                 "promotion_decision": "promoted_manually", "previous_champion": previous}.items():
        client.set_model_version_tag(name, version, k, v)
    if previous not in ("none", version):
        client.set_model_version_tag(name, previous, "replaced_by", f"v{version} (manual, {_now()})")
    return client.get_model_version(name, version)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"

"""Data commands of the CLI: generate, features, score (offline batch) and drift."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
import pandas as pd

from training.cli import feature_progress, history_for, history_options
from training.drift import MIN_ITEMS as MIN_DRIFT_ITEMS

DOMAIN = click.option("--domain", type=click.Choice(["customs", "finance"]), required=True, help="Which model family.")


@click.command("generate")
@DOMAIN
@click.option("--rows", type=click.IntRange(1_000), default=100_000, show_default=True, help="Events to generate.")
@click.option("--seed", type=int, default=7, show_default=True, help="Random seed (same seed, same data).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output directory.")
@click.option("--positive-rate", type=click.FloatRange(0.001, 0.2), default=0.03, show_default=True,
              help="Share of events belonging to planted typologies.")
def generate_cmd(domain: str, rows: int, seed: int, out_dir: str, positive_rate: float) -> None:
    """Generate synthetic data in the project format with planted, labelled typologies."""
    from features.synthetic import generate

    path = generate(domain, rows, seed, out_dir, positive_rate=positive_rate, progress=True)
    click.echo(f"wrote {rows:,} {domain} events to {path}")


def _load(domain: str, path: str, label_delay_days: float | None = None):
    from features.datasets import load_dataset

    return load_dataset(domain, path, label_delay_days=label_delay_days)


@click.command("features")
@DOMAIN
@click.option("--in", "in_path", type=click.Path(exists=True), required=True,
              help="Project-format directory, public customs CSV(s) or AMLSim output directory.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), required=True, help="Output .parquet or .csv file.")
@click.option("--label-delay-days", type=click.FloatRange(min=0), default=None,
              help="Days until an event's outcome is known.")
def features_cmd(domain: str, in_path: str, out_file: str, label_delay_days: float | None) -> None:
    """Build the point-in-time feature table (one row per event, id, time and label kept)."""
    from features.domains import events_of, feature_set

    target = output_file(out_file)
    fs = feature_set(domain, label_delay_days)
    started = time.perf_counter()
    data = _load(domain, in_path, label_delay_days)
    events = events_of(data)
    if not len(events):
        raise click.ClickException(f"no events in {in_path}")
    with click.progressbar(length=len(fs.specs), label="features", file=sys.stderr) as bar:
        table = fs.build(events, data.cases, progress=bar.update)
    keep = [c for c in (fs.id_col, fs.time_col, fs.label_col) if c in events.columns]
    out = pd.concat([events[keep].reset_index(drop=True), table.reset_index(drop=True)], axis=1)
    write_table(out, target)
    click.echo(f"wrote {len(out):,} rows x {len(fs.names)} features to {out_file} "
               f"in {time.perf_counter() - started:.1f}s")


def warn_replaced(replaced: int, in_path: str) -> None:
    """Say when events of the history were dropped for sharing ids with the file (ids must name one event)."""
    if replaced:
        click.echo(f"riskscore: warning: {in_path} gives the ids of {replaced:,} history events to events at other "
                   "times; those history events were dropped (give events unique ids, or --no-history)", err=True)


def output_file(out_file: str) -> Path:
    """``--out``, checked before any work: a .csv or .parquet name (any case) whose directory can be created and
    written to."""
    path = Path(out_file)
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise click.BadParameter(f"{out_file!r} must end in .csv or .parquet", param_hint="--out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise click.ClickException(f"cannot write --out {out_file}: {err.strerror or err}") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise click.ClickException(f"cannot write --out {out_file}: "
                                   f"{'it is a directory' if path.is_dir() else 'permission denied'}")
    return path


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as Parquet or CSV, by the name's suffix (see :func:`output_file`)."""
    if path.suffix.lower() == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


def _score_frame(domain: str, in_path: str, top_n: int, history: tuple[Path, ...], no_history: bool):
    """Champion bundle, version, the file's events, features and explanations (features as
    :func:`training.pipeline.features_over_history`, by default over the data the champion was trained on)."""
    from training.pipeline import features_over_history
    from training.registry import load_champion

    bundle, info = load_champion(domain)
    with feature_progress(domain, bundle) as bar:
        hf = features_over_history(bundle, domain, in_path, history=history_for(bundle, history, no_history),
                                   progress=bar.update)
    warn_replaced(hf.replaced, in_path)
    explanations = []
    if not len(hf.events):
        raise click.ClickException(f"no events in {in_path}")
    with click.progressbar(range(0, len(hf.features), 5000), label="scoring", file=sys.stderr) as chunks:
        for start in chunks:
            explanations += bundle.explain(hf.features.iloc[start:start + 5000], top_n=top_n)
    return bundle, info, hf, explanations


@click.command("score")
@DOMAIN
@click.option("--in", "in_path", type=click.Path(exists=True), required=True, help="Events to score (CSV/Parquet).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), required=True, help="Output .csv or .parquet.")
@click.option("--top", "top_n", type=click.IntRange(1, 20), default=5, show_default=True, help="Reasons per item.")
@history_options
def score_cmd(domain: str, in_path: str, out_file: str, top_n: int, history: tuple[Path, ...],
              no_history: bool) -> None:
    """Batch-score a file offline with the registered champion: score, band, flag and top reasons.

    Labels in the file (if any) count as outcomes known after the label delay, as in training and `evaluate`.
    """
    target = output_file(out_file)
    bundle, info, hf, explanations = _score_frame(domain, in_path, top_n, history, no_history)
    rows = []
    for event_id, exp in zip(hf.events[hf.fs.id_col], explanations, strict=True):
        row = {"id": event_id, "score": exp.score, "band": exp.band, "flagged": exp.flagged,
               "base_value": exp.base_value, "model_version": str(info.version)}
        for rank, reason in enumerate(exp.reasons, start=1):
            row[f"reason_{rank}"] = reason.label
            row[f"reason_{rank}_value"] = None if reason.value is None else str(reason.value)
            row[f"reason_{rank}_contribution"] = reason.contribution
        rows.append(row)
    out = pd.DataFrame(rows)
    write_table(out, target)
    click.echo(f"scored {len(out):,} items with {bundle.domain} model v{info.version} "
               f"(history: {hf.history_events:,} events): {int(out['flagged'].sum()):,} flagged -> {out_file}")


@click.command("drift")
@DOMAIN
@click.option("--data", "in_path", type=click.Path(exists=True), default=None,
              help="Recent events to compare (default: the service's recent scores in the audit store).")
@click.option("--window", type=click.IntRange(1), default=5000, show_default=True,
              help="Without --data: how many of the latest audited scores to compare.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--fail-on-retrain", is_flag=True, help="Exit with status 3 when retraining is due (for cron/CI).")
@click.option("--min-items", type=click.IntRange(1), default=MIN_DRIFT_ITEMS, show_default=True,
              help="Fewer recent items than this give no verdict (status 'insufficient'): PSI of a few dozen "
                   "rows is mostly noise.")
@history_options
def drift_cmd(domain: str, in_path: str | None, window: int, as_json: bool, fail_on_retrain: bool, min_items: int,
              history: tuple[Path, ...], no_history: bool) -> None:
    """PSI of each feature and of the score against the champion's reference (its calibration window)."""
    from training.drift import drift_report, drift_summary

    if not in_path and (history or no_history):
        raise click.UsageError("--history and --no-history apply to --data (audited scores have their features)")
    if in_path:
        bundle, _info, hf, explanations = _score_frame(domain, in_path, 1, history, no_history)
        feats = hf.features
        scores = [e.score for e in explanations]
        source = in_path
    else:
        from serving.audit import AuditStore
        from training.registry import load_champion

        bundle, info = load_champion(domain)
        store = AuditStore()
        source = f"the latest {{:,}} audited scores of v{info.version}"
        try:  # the champion's own scores; if it has scored nothing yet, earlier versions' features (not scores)
            feats, scores = store.recent_features(domain, window, model_version=str(info.version))
            if not len(scores):
                feats, scores = store.recent_features(domain, window)[0], None
                source = (f"the latest {{:,}} audited items of earlier versions: features only, v{info.version} "
                          "has scored none")
        finally:
            store.close()
        source = source.format(len(feats))
    if not len(feats):
        raise click.ClickException("no audited scores to compare: pass --data, or score items through the service "
                                   "first (offline `score` does not write the audit store)")
    if not (bundle.reference or {}).get("features"):
        raise click.ClickException(f"the {domain} champion has no drift reference: retrain it with this version")
    report = drift_report(bundle.reference, feats, scores)
    summary = drift_summary(report, items=len(feats), min_items=min_items)
    if as_json:
        click.echo(json.dumps({"domain": domain, "source": source, "items": len(feats), **summary,
                               "report": report.to_dict(orient="records")}, indent=1))
    else:
        click.echo(f"{domain}: {len(feats):,} recent items ({source}) against {bundle.reference.get('rows', '?')} "
                   f"rows of the {bundle.reference.get('window', 'training')} window")
        click.echo(report.head(20).to_string(index=False))
        learned = [name for name, prof in bundle.reference["features"].items() if prof.get("watch_only")]
        if learned and (report["name"].isin(learned) & (report["status"] != "ok")).any():
            click.echo(f"(learned outcome rates, at most `watch`: {', '.join(learned)}; their values move as outcomes "
                       "accrue)")
        click.echo({"retrain": "retraining is due", "watch": "drift to watch", "ok": "no drift",
                    "insufficient": f"too few items for a verdict ({len(feats):,} < {min_items:,}, --min-items)"}[
                       summary["status"]])
    if fail_on_retrain and summary["retrain_due"]:
        raise SystemExit(3)

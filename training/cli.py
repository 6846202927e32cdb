"""Click commands ``train``, ``promote`` and ``evaluate`` (attached to the ``riskscore`` group by riskscore.cli)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click
from click.core import ParameterSource

DOMAIN = click.Choice(["customs", "finance"])
EXISTING = click.Path(exists=True, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def history_options(command):
    """``--history PATH`` / ``--no-history`` of the commands that compute features of a file with a model."""
    command = click.option("--no-history", is_flag=True,
                           help="Features from the file alone (a cold entity history).")(command)
    return click.option("--history", type=EXISTING, multiple=True,
                        help="Earlier events that features look back on; not scored; repeat for several datasets. "
                             "Default: the data the model was trained and tested on, the history the service "
                             "starts from.")(command)


def feature_progress(domain: str, bundle):
    """A progress bar on stderr over the feature specs that a model's features take (history and file)."""
    from features.domains import feature_set

    specs = len(feature_set(domain, getattr(bundle, "label_delay_days", None)).specs)
    return click.progressbar(length=specs, label="features", file=sys.stderr)


def history_for(bundle, history: tuple[Path, ...], no_history: bool) -> list[Path]:
    """The datasets a command's features look back on: ``--history``, none, or the data the model was trained on."""
    if history and no_history:
        raise click.UsageError("--history and --no-history exclude each other")
    if history or no_history:
        return list(history)
    default = [Path(p) for p in bundle.history_paths()]
    if missing := [p for p in default if not p.exists()]:
        raise click.ClickException(f"the model's training data {missing[0]} (part of the default history) is not "
                                   "here; pass --history PATH or --no-history")
    return default


def history_label(history: list[Path]) -> str:
    """``a.csv + b.csv``, or ``none``."""
    return " + ".join(p.name for p in history) or "none"


def _one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@click.command("train")
@click.option("--domain", type=DOMAIN, help="customs (declarations) or finance (transfers).")
@click.option("--data", type=EXISTING, help="Dataset: project directory, public customs CSV(s) or AMLSim output.")
@click.option("--train", "train_path", type=EXISTING, help="Training file (with --eval: the files are the windows).")
@click.option("--eval", "eval_path", type=EXISTING,
              help="Evaluation file = test window; the training file is split into train/validation/calibration.")
@click.option("--cases", "cases_path", type=EXISTING_FILE,
              help="Extra reviewer outcomes (cases table, Parquet or CSV).")
@click.option("--reviewer-outcomes/--no-reviewer-outcomes", default=True, show_default=True,
              help="Use outcomes recorded by reviewers in the service's audit store as cases and labels.")
@click.option("--audit-url", help="Audit store to read outcomes from [default: $RISKSCORE_AUDIT_URL or "
              "<RISKSCORE_HOME>/audit.db].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of everything random.")
@click.option("--capacity", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True,
              help="Review capacity: share of events reviewers can inspect (sets the threshold).")
@click.option("--target-precision", type=click.FloatRange(0, 1, min_open=True),
              help="Set the threshold for this precision instead of capacity.")
@click.option("--label-delay-days", type=click.FloatRange(min=0),
              help="Days until an outcome is known (default: domain default).")
@click.option("--warmup-days", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Events of the data's first days are history only (their entities all look new).")
@click.option("--search-trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random-search LightGBM trials (best by validation PR-AUC).")
@click.option("--search-seconds", type=click.FloatRange(min=0, min_open=True),
              help="Time budget of the search in seconds (alone: as many trials as fit).")
@click.option("--num-threads", type=click.IntRange(min=1), default=2, show_default=True, help="LightGBM threads.")
@click.option("--no-register", is_flag=True, help="Track the run but do not register or promote the model.")
@click.option("--engine", type=click.Choice(["pandas", "dask"]), default="pandas", show_default=True,
              help="dask: build features and train LightGBM on a Dask cluster (pip install 'riskscore[dask]').")
@click.option("--scheduler", help="Dask scheduler address, e.g. tcp://host:8786 (default: a local 2-worker cluster).")
@click.option("--config", "config_file", type=EXISTING,
              help="TOML file with the same keys (e.g. capacity = 0.02, [lgbm] num_leaves = 63); flags win.")
@click.pass_context
def train_cmd(ctx: click.Context, config_file: Path | None, **flags) -> None:
    """Train baseline, raw-column LightGBM and the full pipeline; log to MLflow; register and promote.

    Windows are by time (never random). The new version gets the alias ``challenger`` and becomes ``champion`` if
    it beats the current champion on this run's test window (higher PR-AUC, no worse precision at capacity).

    \b
    Examples:
      riskscore train --domain customs --data data/customs
      riskscore train --domain customs --train df_syn_train_eng.csv --eval df_syn_valid_eng.csv
      riskscore train --domain finance --data data/finance --engine dask --scheduler tcp://host:8786
    """
    from training.pipeline import TRAIN_STAGES, load_config, read_toml, summary, train

    evaluated: list = []  # the result once evaluated: its metrics are shown even if tracking then fails
    show = True
    try:
        settings = read_toml(config_file) if config_file else {}
        given = {k: v for k, v in flags.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
        domain = given.get("domain") or settings.get("domain")
        data = given.get("data") or settings.get("data")
        train_path = given.get("train_path") or settings.get("train")
        if domain is None:
            raise click.UsageError("--domain customs|finance is required")
        if domain not in ("customs", "finance"):
            raise click.UsageError(f"domain must be customs or finance, not {domain!r}")
        if data and train_path:
            raise click.UsageError("use --data or --train, not both")
        data = data or train_path
        if not data:
            raise click.UsageError("--data (or --train with --eval) is required")
        if flags.get("scheduler") and (given.get("engine") or settings.get("engine")) != "dask":
            raise click.UsageError("--scheduler needs --engine dask")
        overrides = {k: v for k, v in flags.items() if k not in ("domain", "data", "train_path")}
        overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()
                     if k in given or (config_file is None and v is not None)}
        if overrides.pop("no_register", False):
            overrides["register"] = False
        config = load_config(config_file, **overrides)
        show = not config.quiet
        stages = [s for s in TRAIN_STAGES if config.track or s not in ("tracking", "registry")]
        if not config.registers:
            stages = [s for s in stages if s != "registry"]
        labels = {"load": "loading data", "features": "point-in-time features", "baseline": "baseline",
                  "lgbm_full": "LightGBM", "lgbm_raw": "raw-column LightGBM", "tracking": "MLflow run",
                  "calibrate_evaluate": "calibration and metrics", "registry": "registry and promotion"}
        with click.progressbar(length=len(stages), label="training", file=sys.stderr,
                               item_show_func=lambda stage: labels.get(stage or "", stage)) as bar:
            bar.current_item = stages[0]
            bar.render_progress()
            ahead = iter(stages[1:])

            def step(_done: str) -> None:
                bar.update(1, next(ahead, None))

            result = train(domain, data, config=replace(config, quiet=True), progress=step,
                           evaluated=evaluated.append)
        if show:  # after the bar: the table does not share the terminal with it
            click.echo(summary(result))
    except click.ClickException:
        raise
    except Exception as err:
        if evaluated and show:  # trained and evaluated, then tracking or registration failed: keep the metrics
            click.echo(summary(evaluated[0]))
        raise click.ClickException(_one_line(err)) from err


@click.command("promote")
@click.option("--domain", type=DOMAIN, required=True, help="Domain of the registered model.")
@click.option("--version", required=True, help="Registered version number to make champion.")
@click.option("--reason", required=True, help="Why (recorded on the version with who and when).")
@click.option("--by", help="Who promotes (default: $RISKSCORE_USER or the login name).")
def promote_cmd(domain: str, version: str, reason: str, by: str | None) -> None:
    """Make a registered model version the champion by hand (manual override of the promotion rule)."""
    from riskscore import config
    from training.registry import promote

    try:
        mv = promote(domain, version, reason, by=by)
    except Exception as err:
        raise click.ClickException(_one_line(err)) from err
    click.echo(f"{config.model_name(domain)} v{mv.version} is now champion "
               f"(by {mv.tags.get('promoted_by')}: {mv.tags.get('promotion_reason')})")


@click.command("evaluate")
@click.option("--domain", type=DOMAIN, required=True, help="Domain of the registered model.")
@click.option("--data", type=EXISTING, required=True, help="Labelled dataset to evaluate on.")
@click.option("--version", help="Registered version number (default: the alias).")
@click.option("--alias", default="champion", show_default=True, help="Registered alias when --version is not given.")
@history_options
@click.option("--cases", "cases_path", type=EXISTING_FILE, help="Extra reviewer outcomes (cases table).")
@click.option("--capacity", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True,
              help="Review capacity for the metrics.")
def evaluate_cmd(domain: str, data: Path, version: str | None, alias: str, history: tuple[Path, ...], no_history: bool,
                 cases_path: Path | None, capacity: float) -> None:
    """Metrics of a registered model on a labelled file: PR-AUC, ROC-AUC, precision/recall in the top 1/2/5/10%."""
    from training.metrics import TOP_FRACTIONS, pct_label
    from training.pipeline import evaluate_bundle
    from training.registry import fitted_until, load_model

    try:
        bundle, mv = load_model(domain, version=version, alias=None if version else alias)
        looked_back = history_for(bundle, history, no_history)
        until = fitted_until(bundle, mv)
        with feature_progress(domain, bundle) as bar:
            m = evaluate_bundle(bundle, domain, data, history=looked_back, cases_path=cases_path, capacity=capacity,
                                fitted_until=until, progress=bar.update)
    except click.ClickException:
        raise
    except Exception as err:
        raise click.ClickException(_one_line(err)) from err
    click.echo(f"{mv.name} v{mv.version} on {data.name}: {int(m['rows'])} labelled events, "
               f"{int(m['positives'])} positives")
    click.echo(f"  history: {history_label(looked_back)} ({m['history_events']:,} events)")
    if m.get("history_replaced"):
        click.echo(f"  warning: {data.name} gives the ids of {int(m['history_replaced']):,} history events to events "
                   "at other times; those history events were dropped (give events unique ids)")
    if m.get("in_sample"):
        click.echo(f"  warning: {int(m['in_sample']):,} of {int(m['rows']):,} labelled events are not later than the "
                   f"data this model was fitted on (up to {until}): the metrics below are partly in-sample")
    click.echo(f"  PR-AUC  {m['pr_auc']:.4f}\n  ROC-AUC {m['roc_auc']:.4f}\n  Brier   {m['brier']:.4f}")
    fractions = sorted({*TOP_FRACTIONS, capacity})
    revenue = all(f"revenue_share_at_{pct_label(f)}pct" in m for f in fractions)  # where the data has revenue
    click.echo(f"  {'top':>5s} {'precision':>10s} {'recall':>8s}" + (f" {'revenue':>8s}" if revenue else ""))
    for frac in fractions:
        p = pct_label(frac)
        click.echo(f"  {p + '%':>5s} {m[f'precision_at_{p}pct']:10.4f} {m[f'recall_at_{p}pct']:8.4f}"
                   + (f" {m[f'revenue_share_at_{p}pct']:8.4f}" if revenue else ""))
    at_threshold = m["precision_at_threshold"]
    precision = "n/a (nothing flagged)" if at_threshold != at_threshold else f"{at_threshold:.4f}"  # NaN
    click.echo(f"  threshold {bundle.threshold:.4g}: flags {m['flag_rate']:.2%}, precision {precision}, "
               f"recall {m['recall_at_threshold']:.4f}")
    if "account_k" in m:
        click.echo(f"  accounts: the top {int(m['account_k']):,} by their highest transfer score: precision "
                   f"{m['account_precision_at_k']:.4f}, recall {m['account_recall_at_k']:.4f}")
    typologies = {k.removeprefix("recall_"): v for k, v in m.items()
                  if k.startswith("recall_") and not k.startswith("recall_at_")}
    if typologies:
        click.echo(f"  recall in the top {pct_label(capacity)}% by typology: "
                   + ", ".join(f"{name} {value:.3f}" for name, value in sorted(typologies.items())))

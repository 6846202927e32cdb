"""Model-quality benchmark: the full riskscore pipeline against its own ablations on public and synthetic data.

Three sections, each trained with :func:`training.pipeline.train` (registration disabled; the MLflow runs go to a
temporary store unless ``--no-track``), metrics read from the pipeline's own results and metric functions:

1. **Public customs declarations** (``df_syn_train_eng.csv`` -> train / validation / calibration by time,
   ``df_syn_valid_eng.csv`` = test window, label ``Fraud``): logistic baseline, LightGBM on the raw columns
   only, and the full pipeline -- ROC-AUC, PR-AUC, precision / recall in the top 1/2/5/10 %, Brier.
2. **AMLSim** (``amlsim-20k-fanin``): train on the early time steps, evaluate on the later ones (the pipeline's
   time split); transfer metrics plus account-level precision / recall at ``k`` = the number of true
   laundering accounts active in the evaluation window (account score = max score of its transfers).
3. **Synthetic data** (:func:`features.synthetic.generate`, planted typologies): recall of each typology in
   the top ``capacity`` (5 %) of the test window, i.e. what a review team with that capacity would catch.

    .venv/bin/python bench/quality.py [--out bench/quality_results.md] [--data ../shared/data]

Prints the markdown tables and, with ``--out``, writes them together with the command used.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from training.metrics import account_precision_recall_at_k, account_scores, pct_label  # noqa: E402
from training.pipeline import ACCOUNT_COLS, MODEL_TITLES, TrainConfig, TrainResult, train  # noqa: E402

FRACTIONS = (0.01, 0.02, 0.05, 0.10)
TARGETS = {"pr_auc": 0.62, "precision_at_5pct": 0.88}  # the customs quality bar (full pipeline, test window)
SYNTHETIC = (("customs", 20_000), ("finance", 50_000))


def _rel(path: Path | str) -> str:
    """A path as given relative to the repository when it is inside or beside it (no machine paths in output)."""
    p = Path(path).resolve()
    try:
        return os.path.relpath(p, REPO) if p.is_relative_to(REPO.parent) else p.name
    except ValueError:
        return p.name


def command_line(argv: list[str]) -> str:
    """The command that produced the results, with paths made relative to the repository."""
    exe = Path(sys.executable)
    python = ".venv/bin/python" if exe.absolute().is_relative_to(REPO / ".venv") else "python"
    args = [_rel(a) if (os.sep in a and Path(a).exists()) else a for a in argv[1:]]
    return shlex.join([python, _rel(argv[0]), *args])


def _fmt(value: float, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def markdown(frame: pd.DataFrame, digits: int = 4, counts: tuple[str, ...] = ("positives",)) -> str:
    """A frame as a markdown table (index as the first column; ``counts`` columns as integers)."""
    head = [frame.index.name or "", *map(str, frame.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in frame.iterrows():
        cells = [str(int(v)) if col in counts and not np.isnan(v) else _fmt(float(v), digits)
                 for col, v in row.items()]
        lines.append("| " + " | ".join([str(idx), *cells]) + " |")
    return "\n".join(lines)


def run(domain: str, data: Path, config: TrainConfig) -> tuple[TrainResult, float]:
    start = time.perf_counter()
    result = train(domain, data, config=config)
    return result, time.perf_counter() - start


def metric_frame(result: TrainResult, window: str = "test") -> pd.DataFrame:
    """Models x ROC-AUC, PR-AUC, P/R at each top fraction, Brier on one window."""
    cols = [("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC")]
    for frac in FRACTIONS:
        p = pct_label(frac)
        cols += [(f"precision_at_{p}pct", f"P@{p}%"), (f"recall_at_{p}pct", f"R@{p}%")]
    cols.append(("brier", "Brier"))
    rows = {MODEL_TITLES[name]: {head: m.metrics[window].get(key, np.nan) for key, head in cols}
            for name, m in result.models.items()}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "model"
    return frame


def window_text(result: TrainResult, window: str = "test") -> str:
    m = result.models["full"].metrics[window]
    return f"{result.split.describe()[window]}, {int(m['positives'])} positives"


# ---------------------------------------------------------------------------------------------- sections


def customs_public(data_dir: Path, base: TrainConfig) -> tuple[str, dict]:
    folder = data_dir / "customs-declarations"
    train_csv, valid_csv = folder / "df_syn_train_eng.csv", folder / "df_syn_valid_eng.csv"
    result, seconds = run("customs", train_csv, replace(base, eval_path=str(valid_csv)))
    table = metric_frame(result)
    full, raw = result.models["full"].metrics["test"], result.models["lgbm_raw"].metrics["test"]
    checks = []
    for key, target in TARGETS.items():
        name = "PR-AUC" if key == "pr_auc" else "P@5%"
        ok = full[key] >= target and full[key] > raw[key]
        checks.append(f"- {name}: full {full[key]:.4f} (target >= {target}), raw-column LightGBM {raw[key]:.4f} "
                      f"-> {'met' if ok else 'NOT met'}")
    text = "\n".join([
        "## 1. Public customs declarations",
        "",
        f"Train `{_rel(train_csv)}` (split by time into train / validation / calibration), test window = "
        f"`{_rel(valid_csv)}`: {window_text(result)}. Label `Fraud`. Threshold/capacity 5 %; "
        f"LightGBM {result.lgbm.best_iteration} trees; {seconds:.0f} s.",
        "",
        markdown(table),
        "",
        "Quality bar (full pipeline must beat raw-column LightGBM and reach the targets):",
        "",
        *checks,
    ])
    return text, {"customs_public": table}


def amlsim(data_dir: Path, base: TrainConfig) -> tuple[str, dict]:
    folder = data_dir / "amlsim-20k-fanin"
    result, seconds = run("finance", folder, base)
    pos = result.split["test"]
    events = result.data.events.iloc[pos]
    accounts = result.data.accounts
    labels = accounts.set_index(accounts["account_id"].astype(str))["is_fraud"].astype(float)
    label_col = result.fs.label_col
    laundering = events[events[label_col].astype("Float64").fillna(0).to_numpy(float) == 1]
    in_window = pd.unique(pd.concat([laundering[c].astype(str) for c in ACCOUNT_COLS], ignore_index=True))
    rows = {}
    for name, model in result.models.items():
        acc = account_scores(events, model.scores["test"], ACCOUNT_COLS)
        # k = accounts taking part in a laundering transfer of the window (they launder in the window)
        launders = pd.Series(1.0, index=pd.Index(in_window, dtype=acc.index.dtype))
        k_window = int(launders.reindex(acc.index).fillna(0).sum())
        p_window, r_window = account_precision_recall_at_k(acc, launders, k_window)
        # k = accounts labelled isFraud that are active (any transfer) in the window
        k_active = int(labels.reindex(acc.index).fillna(0).sum())
        p_active, r_active = account_precision_recall_at_k(acc, labels, k_active)
        m = model.metrics["test"]
        rows[MODEL_TITLES[name]] = {
            "transfer PR-AUC": m["pr_auc"], "transfer P@5%": m["precision_at_5pct"],
            "transfer R@5%": m["recall_at_5pct"],
            "account P@k (laundering in window)": p_window, "account R@k (laundering in window)": r_window,
            "account P@k (isFraud active)": p_active, "account R@k (isFraud active)": r_active,
            "account P@5% of accounts": m.get("account_precision_at_k", np.nan),
            "account R@5% of accounts": m.get("account_recall_at_k", np.nan),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    active = account_scores(events, np.zeros(len(events)), ACCOUNT_COLS).index
    fraud_active = set(labels[labels == 1].index.astype(str)) & set(active)
    quiet = len(fraud_active - set(in_window))
    full = rows[MODEL_TITLES["full"]]
    text = "\n".join([
        "## 2. AMLSim (amlsim-20k-fanin)",
        "",
        f"`{_rel(folder)}`: time split of the steps (train / validation / calibration / test = "
        f"{' / '.join(f'{f:.0%}' for f in base.fractions)}); test window {window_text(result)}; {seconds:.0f} s. "
        f"Account score = max score of its transfers in the window; {len(active)} accounts are active in it.",
        "",
        f"- *laundering in window*: k = {k_window} accounts that take part in a laundering transfer of the window;",
        f"- *isFraud active*: k = {k_active} accounts labelled `isFraud` with any transfer in the window. "
        f"{quiet} of them take part in no laundering transfer there (only ordinary transfers, labelled "
        "negative), so a transfer model has no positive event to find them by;",
        "- *5 % of accounts*: the pipeline's own account metric (k = 5 % of the active accounts, `isFraud`).",
        "",
        markdown(table),
        "",
        f"Full pipeline account precision at k: {full['account P@k (laundering in window)']:.4f} (laundering in "
        f"window), {full['account P@k (isFraud active)']:.4f} (isFraud active; target 0.8).",
    ])
    return text, {"amlsim": table}


def synthetic(work: Path, base: TrainConfig, seed: int) -> tuple[str, dict]:
    from features.synthetic import generate

    parts = ["## 3. Synthetic data: recall per planted typology at the review capacity", ""]
    tables = {}
    for domain, rows in SYNTHETIC:
        out = generate(domain, rows, seed=seed, out_dir=work / f"{domain}-{rows}-{seed}", progress=False)
        result, seconds = run(domain, out, base)
        cap = pct_label(base.capacity)
        typ_events = result.data.events.iloc[result.split["test"]]
        counts = typ_events["typology"].astype("string").dropna().value_counts() if "typology" in typ_events else {}
        keys = sorted(k for k in result.models["full"].metrics["test"] if k.startswith("recall_")
                      and not k.startswith(("recall_at_",)))
        table = pd.DataFrame({
            MODEL_TITLES[name]: {k.removeprefix("recall_"): m.metrics["test"][k] for k in keys}
            for name, m in result.models.items()
        })
        table.insert(0, "positives", [float(counts.get(_typology_name(k, counts), np.nan)) for k in table.index])
        overall = {MODEL_TITLES[n]: m.metrics["test"][f"recall_at_{cap}pct"] for n, m in result.models.items()}
        table.loc["all positives"] = [float(result.models["full"].metrics["test"]["positives"]), *overall.values()]
        table.index.name = "typology"
        prec = ", ".join(f"{MODEL_TITLES[n]} {m.metrics['test'][f'precision_at_{cap}pct']:.3f}"
                         for n, m in result.models.items())
        parts += [
            f"### {domain}: {rows:,} rows, seed {seed}",
            "",
            f"`features.synthetic.generate('{domain}', {rows}, seed={seed})`; test window {window_text(result)}. "
            f"Recall in the top {base.capacity:.0%} of the test window (precision there: {prec}); {seconds:.0f} s.",
            "",
            markdown(table),
            "",
        ]
        tables[f"synthetic_{domain}"] = table
    return "\n".join(parts).rstrip(), tables


def _typology_name(slug: str, counts) -> str:
    """The typology whose metric slug is ``slug`` (metrics use lower-case alphanumerics and underscores)."""
    for name in getattr(counts, "index", []):
        if "".join(ch if ch.isalnum() else "_" for ch in str(name).lower()).strip("_") == slug:
            return name
    return slug


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown here (e.g. bench/quality_results.md)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder with customs-declarations/ and amlsim-20k-fanin/ (default ../shared/data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="LightGBM threads")
    parser.add_argument("--sections", default="customs,amlsim,synthetic",
                        help="comma-separated subset of customs,amlsim,synthetic")
    parser.add_argument("--no-track", action="store_true", help="no MLflow runs at all (faster)")
    parser.add_argument("--warmup-days", type=float, default=0.0,
                        help="train --warmup-days: the data's first days are history only")
    args = parser.parse_args(argv[1:])
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}

    with tempfile.TemporaryDirectory(prefix="riskscore-quality-") as tmp:
        work = Path(tmp)
        # a throw-away MLflow store: runs are tracked (unless --no-track) but nothing is registered
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        os.environ["RISKSCORE_HOME"] = str(work / "home")
        base = TrainConfig(seed=args.seed, num_threads=args.threads, register=False, track=not args.no_track,
                           quiet=True, warmup_days=args.warmup_days)
        started = time.perf_counter()
        parts = [
            "# Model quality: full pipeline vs baseline and raw-column LightGBM",
            "",
            f"Command: `{command_line(argv)}`",
            "",
            "All numbers are on the **test window** (later in time than everything the models were fitted, "
            "early-stopped or calibrated on). Features are point-in-time. Models: "
            + "; ".join(f"`{k}` = {v}" for k, v in MODEL_TITLES.items()) + ".",
        ]
        if "customs" in sections:
            text, _ = customs_public(args.data, base)
            parts += ["", text]
            print(text, flush=True)
        if "amlsim" in sections:
            text, _ = amlsim(args.data, base)
            parts += ["", text]
            print(text, flush=True)
        if "synthetic" in sections:
            text, _ = synthetic(work / "synthetic", base, args.seed)
            parts += ["", text]
            print(text, flush=True)
        parts += ["", f"Total {time.perf_counter() - started:.0f} s on {os.cpu_count()} CPUs "
                      f"(load {os.getloadavg()[0]:.1f} at the end; shared machine)."]
    doc = "\n".join(parts) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

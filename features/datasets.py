"""Dataset loaders: project format, public Korean customs CSVs and AMLSim output, onto the contracts.

Every table leaves this module validated against :mod:`features.schemas`. CSVs are read as text and
strictly parsed (:func:`~features.schemas.parse_table`); parquet is validated after a lossless
conversion to the contract dtypes. When labels exist, :func:`derive_cases` turns them into cases so
past outcomes are available to point-in-time features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from features.featureset import label_known_at
from features.schemas import TABLES, Column, DataValidationError, parse_table, validate_table

DEFAULT_LABEL_DELAY_DAYS = {"customs": 0.0, "finance": 30.0}
AMLSIM_EPOCH = pd.Timestamp("2020-01-01")

PUBLIC_CUSTOMS_COLUMNS = {
    "Declaration ID": "declaration_id", "Date": "date", "Office ID": "office_id", "Process Type": "process_type",
    "Import Type": "import_type", "Import Use": "import_use", "Payment Type": "payment_type",
    "Mode of Transport": "transport_mode", "Declarant ID": "declarant_id", "Importer ID": "importer_id",
    "Seller ID": "seller_id", "Courier ID": "courier_id", "HS6 Code": "hs6",
    "Country of Departure": "country_departure",
    "Country of Origin": "country_origin", "Tax Rate": "tax_rate", "Tax Type": "tax_type",
    "Country of Origin Indicator": "origin_indicator", "Net Mass": "net_mass", "Item Price": "item_price",
    "Fraud": "fraud", "Critical Fraud": "critical_fraud",
}

# AMLSim spellings (old "nodes/transactions" output, newer "accounts/transactions" output), lower case.
AMLSIM_TX = {
    "transaction_id": ("tran_id", "tx_id", "transaction_id", "txid"),
    "source_account": ("sourcenodeid", "orig_acct", "sender_account_id", "source", "src", "nameorig"),
    "target_account": ("targetnodeid", "bene_acct", "receiver_account_id", "target", "dst", "namedest"),
    "amount": ("value", "base_amt", "tx_amount", "amount", "amt"),
    "time": ("time", "step", "tran_timestamp", "timestamp"),
    "is_laundering": ("is_sar", "issar", "is_fraud", "isfraud"),
}
AMLSIM_NODES = {
    "account_id": ("nodeid", "acct_id", "account_id", "accountid"),
    "is_fraud": ("isfraud", "is_fraud", "is_sar", "issar"),
    "init_balance": ("init_balance", "initial_deposit", "init_amount"),
    "fraud_step": ("fraudstep", "fraud_step"),
}

EVENTS = {
    "customs": ("declarations", "date", "declaration_id"),
    "finance": ("transactions", "timestamp", "transaction_id"),
}


@dataclass
class CustomsData:
    """Customs declarations and cases (both on their contracts)."""

    declarations: pd.DataFrame
    cases: pd.DataFrame


@dataclass
class FinanceData:
    """Transfers, accounts and cases (all on their contracts)."""

    transactions: pd.DataFrame
    accounts: pd.DataFrame
    cases: pd.DataFrame


# ---------------------------------------------------------------------------------------------- reading


def _csv(path: Path, **options) -> pd.DataFrame:
    """``pd.read_csv`` whose failures (empty file, not UTF-8, broken quoting) name the file."""
    try:
        return pd.read_csv(path, **options)
    except pd.errors.EmptyDataError:
        raise DataValidationError(str(path), ["the file is empty (not even a header line)"]) from None
    except UnicodeDecodeError as err:
        raise DataValidationError(str(path), [f"not UTF-8 text ({err.reason} at byte {err.start}); "
                                              "save it as UTF-8"]) from None
    except pd.errors.ParserError as err:
        raise DataValidationError(str(path), [f"not a readable CSV: {str(err).strip()}"]) from None


def _header(path: Path) -> list[str]:
    return [str(c) for c in _csv(path, nrows=0).columns]


def _read_csv(path: Path) -> pd.DataFrame:
    # keep_default_na=False: "NA" is Namibia, not missing; empty fields are handled by the parser.
    return _csv(path, dtype=str, keep_default_na=False)


def _table_file(directory: Path, name: str) -> Path | None:
    """``name/`` (parquet chunks), ``name.parquet`` or ``name.csv`` inside ``directory``."""
    for candidate in (directory / name, directory / f"{name}.parquet", directory / f"{name}.csv"):
        if (candidate.is_dir() and any(candidate.glob("*.parquet"))) or candidate.is_file():
            return candidate
    return None


def _project_files(path: Path, domain: str) -> dict[str, Path] | None:
    """The project-format table files of ``domain`` in directory ``path`` (None when incomplete)."""
    if not path.is_dir():
        return None
    table, _, id_col = EVENTS[domain]
    names = (table,) if domain == "customs" else (table, "accounts")
    found = {name: _table_file(path, name) for name in names}
    if any(f is None for f in found.values()):
        return None
    if found[table].suffix == ".csv" and id_col not in _header(found[table]):  # e.g. AMLSim transactions.csv
        return None
    return found


def _events_file(path: Path, domain: str) -> bool:
    """A single CSV/Parquet file holding the domain's event table in the project's column names."""
    if not path.is_file() or path.suffix not in (".csv", ".parquet"):
        return False
    id_col = EVENTS[domain][2]
    names = _header(path) if path.suffix == ".csv" else pads.dataset(path, format="parquet").schema.names
    return id_col in names


def accounts_of(transactions: pd.DataFrame) -> pd.DataFrame:
    """The ``accounts`` table implied by transfers alone: each account with the country it first appears in."""
    sides = [transactions[[f"{side}_account", f"{side}_country"]].set_axis(["account_id", "country"], axis=1)
             for side in ("source", "target")]
    both = pd.concat(sides, ignore_index=True).drop_duplicates("account_id", ignore_index=True)
    return conform_table(both, "accounts", "transactions")


def read_table(path: Path, table: str) -> pd.DataFrame:
    """One contract table from a CSV (strict parsing) or parquet file/directory (lossless conversion)."""
    if path.suffix == ".csv":
        return parse_table(_read_csv(path), table, str(path))
    df = pads.dataset(path, format="parquet").to_table().to_pandas()
    return conform_table(df, table, str(path))


def _lossless(s: pd.Series, col: Column) -> pd.Series:
    """``s`` in the contract dtype of ``col``; raise TypeError when that would lose information."""
    if col.day and pd.api.types.is_datetime64_any_dtype(s.dtype):
        if getattr(s.dt, "tz", None) is not None:
            s = s.dt.tz_localize(None)  # the day as written (features.schemas._parse_days)
        if (s.dropna() != s.dropna().dt.normalize()).any():
            raise TypeError("a calendar day cannot have a time of day")
    kind = col.kind
    types = pd.api.types
    dtype = s.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        s = s.astype(dtype.categories.dtype)
        dtype = s.dtype
    integer = types.is_integer_dtype(dtype) and not types.is_bool_dtype(dtype)
    if kind == "str" and (integer or (types.is_string_dtype(dtype)
                                      and types.infer_dtype(s, skipna=True) in ("string", "empty"))):
        return s.astype("string")
    if kind == "datetime" and types.is_object_dtype(dtype) and types.infer_dtype(s, skipna=True) == "date":
        return pd.to_datetime(s).astype("datetime64[ns]")  # Parquet date32 (Spark, polars): plain dates
    if kind == "datetime" and types.is_datetime64_any_dtype(dtype):
        if getattr(s.dt, "tz", None) is not None:
            s = s.dt.tz_convert("UTC").dt.tz_localize(None)
        return s.astype("datetime64[ns]")
    if kind == "float" and (types.is_float_dtype(dtype) or (integer and not s.abs().max(skipna=True) > 2**53)):
        return s.astype("float64")
    if kind == "int" and (types.is_bool_dtype(dtype) or types.is_numeric_dtype(dtype)):
        values = s.astype("float64").dropna()
        if (values == values.round()).all():
            return s.astype("Int8") if not values.abs().max() >= 128 else s.astype("Int64")
    raise TypeError(f"cannot convert {dtype} to {kind} without loss")


def conform_table(df: pd.DataFrame, table: str, source: str) -> pd.DataFrame:
    """Convert an already-typed frame (e.g. from parquet) to the contract dtypes and validate it."""
    missing = [c.name for c in TABLES[table] if c.required and c.name not in df.columns]
    if missing:
        raise DataValidationError(source, [f"missing required column(s): {', '.join(missing)}"])
    out = df.reset_index(drop=True).copy()
    problems = []
    for col in TABLES[table]:
        if col.name in out.columns:
            try:
                out[col.name] = _lossless(out[col.name], col)
            except TypeError as err:
                problems.append(f"column '{col.name}': {err}")
    if problems:
        raise DataValidationError(source, problems)
    return validate_table(out, table, source)


def _sort_events(df: pd.DataFrame, time_col: str, id_col: str) -> pd.DataFrame:
    t = df[time_col].to_numpy()
    ids = df[id_col].to_numpy(dtype=object)
    if len(df) < 2 or bool(np.all((t[1:] > t[:-1]) | ((t[1:] == t[:-1]) & (ids[1:] >= ids[:-1])))):
        return df.reset_index(drop=True)
    return df.sort_values([time_col, id_col], kind="stable", ignore_index=True)


# ---------------------------------------------------------------------------------------------- formats


def _public_customs_files(path: Path) -> list[Path]:
    """A public customs CSV (by its ``HS6 Code`` column), or every ``df_syn_*_eng.csv`` of a directory (by name:
    :func:`read_public_customs` then names a file that lacks columns instead of leaving it out)."""
    if path.is_file() and path.suffix == ".csv":
        return [path] if "HS6 Code" in _header(path) else []
    if path.is_dir():
        return sorted(path.glob("df_syn_*_eng.csv"))
    return []


def read_public_customs(files: list[Path]) -> pd.DataFrame:
    """Public Korean customs CSVs (concatenated) on the ``declarations`` contract."""
    parts = []
    for f in files:
        raw = _read_csv(f)
        missing = [c for c in PUBLIC_CUSTOMS_COLUMNS if c not in raw.columns and c not in ("Fraud", "Critical Fraud")]
        if missing:
            raise DataValidationError(str(f), [f"missing required column(s): {', '.join(missing)}"])
        raw = raw.rename(columns=PUBLIC_CUSTOMS_COLUMNS)
        hs = raw["hs6"].str.strip()
        raw["hs6"] = hs.where(~hs.str.fullmatch(r"\d{1,5}"), hs.str.zfill(6))
        parts.append(parse_table(raw, "declarations", str(f)))
    out = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    return validate_table(out, "declarations", ", ".join(str(f) for f in files))


def _pick(columns: list[str], aliases: tuple[str, ...]) -> str | None:
    lower = {c.strip().lower(): c for c in columns}
    return next((lower[a] for a in aliases if a in lower), None)


def _boolish(s: pd.Series) -> pd.Series:
    low = s.str.strip().str.lower()
    return s.mask(low == "true", "1").mask(low == "false", "0")


def _amlsim_files(path: Path) -> tuple[Path, Path] | None:
    tx = path / "transactions.csv"
    if not path.is_dir() or not tx.is_file():
        return None
    cols = _header(tx)
    if "transaction_id" in cols and "source_account" in cols:  # project format written as CSV
        return None
    if not (_pick(cols, AMLSIM_TX["source_account"]) and _pick(cols, AMLSIM_TX["amount"])):
        return None
    for name in ("nodes.csv", "accounts.csv"):
        nodes = path / name
        if nodes.is_file() and _pick(_header(nodes), AMLSIM_NODES["account_id"]):
            return nodes, tx
    return None


def read_amlsim(nodes_path: Path, tx_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """AMLSim nodes/accounts + transactions on the ``transactions`` and ``accounts`` contracts.

    Without a label column, a transfer is laundering when both accounts are marked fraudulent and, when the nodes
    carry AMLSim's ``fraudStep``, it happens at its sender's fraud step (the pattern's transfers; fraudulent
    accounts also make ordinary transfers, before and after, which must not count as laundering nor open cases).
    """
    nodes = _read_csv(nodes_path)
    n_cols = {k: _pick(list(nodes.columns), v) for k, v in AMLSIM_NODES.items()}
    acc = pd.DataFrame({"account_id": nodes[n_cols["account_id"]], "country": "US"})
    if n_cols["init_balance"]:
        acc["init_balance"] = nodes[n_cols["init_balance"]]
    if n_cols["is_fraud"]:
        acc["is_fraud"] = _boolish(nodes[n_cols["is_fraud"]])
    accounts = parse_table(acc, "accounts", str(nodes_path))

    raw = _read_csv(tx_path)
    t_cols = {k: _pick(list(raw.columns), v) for k, v in AMLSIM_TX.items()}
    absent = [AMLSIM_TX[k][0] for k in ("source_account", "target_account", "amount", "time") if not t_cols[k]]
    if absent:
        raise DataValidationError(str(tx_path), [f"missing required column(s): {', '.join(absent)}"])
    n = len(raw)
    ids = raw[t_cols["transaction_id"]] if t_cols["transaction_id"] else pd.Series(
        [f"{i:0{len(str(max(n - 1, 0)))}d}" for i in range(n)], dtype=object)
    time_raw = raw[t_cols["time"]]
    steps = pd.to_numeric(time_raw.str.strip(), errors="coerce")
    numeric = bool(n) and bool(steps.notna().all())
    timestamp = (AMLSIM_EPOCH + pd.to_timedelta(steps, unit="D")).astype(str) if numeric else time_raw
    tx = pd.DataFrame({
        "transaction_id": ids, "timestamp": timestamp,
        "source_account": raw[t_cols["source_account"]], "target_account": raw[t_cols["target_account"]],
        "amount": raw[t_cols["amount"]], "currency": "USD", "channel": "wire",
        "source_country": "US", "target_country": "US",
    })
    if t_cols["is_laundering"]:
        tx["is_laundering"] = _boolish(raw[t_cols["is_laundering"]])
        tx = parse_table(tx, "transactions", str(tx_path))
    else:
        tx = parse_table(tx, "transactions", str(tx_path))
        if "is_fraud" in accounts:
            bad = set(accounts.loc[accounts["is_fraud"] == 1, "account_id"])
            both = tx["source_account"].isin(bad) & tx["target_account"].isin(bad)
            if n_cols["fraud_step"] and numeric:  # the pattern's transfers: at the sender's fraudStep only
                fraud_step = pd.to_numeric(nodes[n_cols["fraud_step"]].str.strip(), errors="coerce")
                step_of = dict(zip(nodes[n_cols["account_id"]].str.strip(), fraud_step.where(fraud_step >= 0),
                                   strict=True))
                step = (tx["timestamp"] - AMLSIM_EPOCH) / pd.Timedelta(days=1)
                both &= step.to_numpy() == tx["source_account"].map(step_of).to_numpy(float)
            tx["is_laundering"] = both.astype("Int8")
    return tx, accounts


# ---------------------------------------------------------------------------------------------- cases


def empty_cases() -> pd.DataFrame:
    """A cases table with no rows."""
    return pd.DataFrame({
        "case_id": pd.Series(dtype="string"), "entity_kind": pd.Series(dtype="string"),
        "entity_id": pd.Series(dtype="string"), "opened_at": pd.Series(dtype="datetime64[ns]"),
        "closed_at": pd.Series(dtype="datetime64[ns]"), "outcome": pd.Series(dtype="string"),
        "source": pd.Series(dtype="string"),
    })


def _cases_frame(kind: str, ids: pd.Series, opened: pd.Series, closed: pd.Series,
                 outcome: str | pd.Series, case_ids: pd.Series) -> pd.DataFrame:
    return pd.DataFrame({
        "case_id": case_ids.astype("string").to_numpy(),
        "entity_kind": kind,
        "entity_id": ids.astype("string").to_numpy(),
        "opened_at": opened.astype("datetime64[ns]").to_numpy(),
        "closed_at": closed.astype("datetime64[ns]").to_numpy(),
        "outcome": outcome if isinstance(outcome, str) else outcome.to_numpy(),
        "source": "derived",
    })


def derive_cases(domain: str, events: pd.DataFrame, label_delay_days: float | None = None) -> pd.DataFrame:
    """Cases implied by labelled events (see module docs); closed ``label_delay_days`` after opening, or when the
    outcome was decided (``label_known_at``, reviewer outcomes) if that is later.

    customs: one case per labelled declaration for its importer, declarant and seller (when present),
    confirmed when ``fraud == 1`` else cleared. finance: one confirmed case per account involved in a
    laundering transfer, opened at its first such transfer.
    """
    delay = pd.Timedelta(days=DEFAULT_LABEL_DELAY_DAYS[domain] if label_delay_days is None else label_delay_days)
    parts = [empty_cases()]
    if domain == "customs" and "fraud" in events:
        lab = events[events["fraud"].notna()]
        outcome = pd.Series(np.where(lab["fraud"].to_numpy(dtype=float) == 1, "confirmed", "cleared"), index=lab.index)
        for kind, col in (("importer", "importer_id"), ("declarant", "declarant_id"), ("seller", "seller_id")):
            sub = lab[lab[col].notna()]
            ids = kind + ":" + sub["declaration_id"].astype(str)
            parts.append(_cases_frame(kind, sub[col], sub["date"], label_known_at(sub, sub["date"], delay),
                                      outcome[sub.index], ids))
    elif domain == "finance" and "is_laundering" in events:
        bad = events[events["is_laundering"].fillna(0) == 1]
        known = label_known_at(bad, bad["timestamp"], delay)
        ends = pd.concat([
            pd.DataFrame({"entity_id": bad["source_account"], "t": bad["timestamp"], "known": known}),
            pd.DataFrame({"entity_id": bad["target_account"], "t": bad["timestamp"], "known": known}),
        ])
        # opened at the account's first laundering transfer, closed when the first of their outcomes was known
        first = ends.groupby("entity_id", sort=True, observed=True).agg(t=("t", "min"), known=("known", "min"))
        first = first.reset_index()
        parts.append(_cases_frame("account", first["entity_id"], first["t"], first["known"], "confirmed",
                                  "account:" + first["entity_id"].astype(str)))
    out = pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)
    for col in ("case_id", "entity_kind", "entity_id", "outcome", "source"):
        out[col] = out[col].astype("string")
    return validate_table(out, "cases", f"derived {domain} cases")


def merge_cases(existing: pd.DataFrame | None, derived: pd.DataFrame) -> pd.DataFrame:
    """``existing`` plus the derived cases it does not already cover: the same case_id, or the same entity, opening
    and outcome, one derived case per existing one (a customs importer has one derived case per declaration: one
    external case of a day must not stand for all of that day's)."""
    if existing is None or not len(existing):
        return derived.reset_index(drop=True)
    key = ["entity_kind", "entity_id", "opened_at", "outcome"]
    text = {"entity_kind": "string", "entity_id": "string", "outcome": "string"}
    covered = derived["case_id"].isin(existing["case_id"]).to_numpy()
    others = existing[~existing["case_id"].isin(derived["case_id"])][key].astype(text)
    available = others.groupby(key, observed=True, dropna=False).size().rename("available")
    open_ = derived.loc[~covered, key].astype(text)
    rank = open_.groupby(key, observed=True, dropna=False).cumcount()
    have = open_.join(available, on=key)["available"].fillna(0).to_numpy()
    covered[~covered] = rank.to_numpy() < have
    out = pd.concat([existing, derived[~covered]], ignore_index=True)
    for col in ("source", "note"):
        if col in out:
            out[col] = out[col].astype("string")
    return validate_table(out, "cases", "cases")


# ---------------------------------------------------------------------------------------------- API


def _not_found(domain: str, path: Path) -> ValueError:
    looked = {
        "customs": "a directory with declarations.(parquet|csv) or declarations/*.parquet, a public customs CSV "
                   "or a directory of df_syn_*_eng.csv files",
        "finance": "a directory with transactions.(parquet|csv) + accounts.(parquet|csv), or an AMLSim output "
                   "directory with nodes.csv (or accounts.csv) + transactions.csv",
    }[domain]
    return ValueError(f"no {domain} dataset found at {path}: looked for {looked}")


def load_dataset(domain: str, path: str | Path, label_delay_days: float | None = None) -> CustomsData | FinanceData:
    """Load a dataset in any supported format onto the contracts (format detected from the files)."""
    if domain not in EVENTS:
        raise ValueError(f"unknown domain {domain!r}: use customs or finance")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no {domain} dataset found at {path}: the path does not exist")
    table, time_col, id_col = EVENTS[domain]
    cases_file = _table_file(path, "cases") if path.is_dir() else None
    cases = read_table(cases_file, "cases") if cases_file else None
    accounts = None
    if project := _project_files(path, domain):
        events = read_table(project[table], table)
        if domain == "finance":
            accounts = read_table(project["accounts"], "accounts")
    elif _events_file(path, domain):  # one file of events in the project's columns (e.g. new items to score)
        events = read_table(path, table)
        if domain == "finance":
            accounts = accounts_of(events)
    elif domain == "customs" and (files := _public_customs_files(path)):
        events = read_public_customs(files)
    elif domain == "finance" and (aml := _amlsim_files(path)):
        events, accounts = read_amlsim(*aml)
    else:
        raise _not_found(domain, path)
    events = _sort_events(events, time_col, id_col)
    cases = merge_cases(cases, derive_cases(domain, events, label_delay_days))
    if domain == "customs":
        return CustomsData(declarations=events, cases=cases)
    return FinanceData(transactions=events, accounts=accounts.reset_index(drop=True), cases=cases)


def given_cases(cases: pd.DataFrame) -> pd.DataFrame:
    """The cases of a dataset that were not derived from its labels (a cases table, reviewer outcomes)."""
    if "source" not in cases:
        return cases
    return cases[cases["source"].astype("string").ne("derived").fillna(True).to_numpy(bool)]


def load_datasets(domain: str, paths: Sequence[str | Path],
                  label_delay_days: float | None = None) -> CustomsData | FinanceData:
    """Several datasets read as one, e.g. a model's training and evaluation files (the history it looked back on).

    Events come out in time order; an event id in more than one dataset is kept once, from the last one that has
    it. Cases implied by labels are derived again from these events; given cases tables and (finance) accounts are
    merged, the last dataset's copy winning.
    """
    if not paths:
        raise ValueError(f"no {domain} dataset given")
    loaded = [load_dataset(domain, path, label_delay_days) for path in paths]
    if len(loaded) == 1:
        return loaded[0]
    _table, time_col, id_col = EVENTS[domain]
    frames = [d.declarations if domain == "customs" else d.transactions for d in loaded]
    events = pd.concat(frames, ignore_index=True).drop_duplicates(id_col, keep="last")
    events = _sort_events(events, time_col, id_col)
    given = pd.concat([given_cases(d.cases) for d in loaded], ignore_index=True)
    given = given.drop_duplicates("case_id", keep="last", ignore_index=True)
    cases = merge_cases(given, derive_cases(domain, events, label_delay_days))
    if domain == "customs":
        return CustomsData(declarations=events, cases=cases)
    accounts = pd.concat([d.accounts for d in loaded], ignore_index=True).drop_duplicates("account_id", keep="last")
    return FinanceData(transactions=events, accounts=accounts.reset_index(drop=True), cases=cases)


def save_dataset(data: CustomsData | FinanceData, out_dir: str | Path) -> Path:
    """Write ``data`` in the project format (one parquet file per table); ``load_dataset`` reads it back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"cases": data.cases}
    if isinstance(data, CustomsData):
        tables["declarations"] = data.declarations
    else:
        tables.update(transactions=data.transactions, accounts=data.accounts)
    for name, df in tables.items():
        df.reset_index(drop=True).to_parquet(out / f"{name}.parquet", index=False)
    return out

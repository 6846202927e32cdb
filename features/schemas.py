"""Data contracts: one pandera schema per table, strict parsing with row/column-level errors.

Every loader goes through :func:`parse_table`, which converts raw (string) columns into the
contract's types *without* silent coercion: a value that cannot be parsed, a missing column, a
negative amount or a duplicate id raises :class:`DataValidationError` naming the source, the
row and the column. Row count in equals row count out, or an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pandera.pandas as pa

COUNTRY_PATTERN = r"^[A-Z]{2}$"
HS6_PATTERN = r"^\d{6}$"
CASE_OUTCOMES = ("confirmed", "cleared")
ENTITY_KINDS = ("importer", "declarant", "seller", "courier", "account")


class DataValidationError(ValueError):
    """Input data broke a contract; the message names source, row(s), column and reason."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        shown = "; ".join(problems[:10])
        more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(f"{source}: {shown}{more}")


@dataclass(frozen=True)
class Column:
    """One contract column: name, kind, whether required and nullable, and a value check."""

    name: str
    kind: str  # "str" | "datetime" | "float" | "int"
    required: bool = True
    nullable: bool = False
    checks: tuple[pa.Check, ...] = field(default_factory=tuple)
    unique: bool = False
    description: str = ""
    day: bool = False  # a calendar day (datetime kind): the date as written, a time of day is refused (as the API)


def _cat(name: str, description: str, nullable: bool = False) -> Column:
    return Column(name, "str", nullable=nullable, description=description)


NON_NEGATIVE = (pa.Check.ge(0, error="must be >= 0"),)
COUNTRY = (pa.Check.str_matches(COUNTRY_PATTERN, error="must be a 2-letter ISO country code"),)
BINARY = (pa.Check.isin([0, 1], error="must be 0 or 1"),)

DECLARATION_COLUMNS: tuple[Column, ...] = (
    Column("declaration_id", "str", unique=True, description="Declaration line id"),
    Column("date", "datetime", day=True,
           description="Declaration date: a calendar day (a time must be midnight; an offset is ignored)"),
    _cat("office_id", "Customs office"),
    _cat("process_type", "Customs process type"),
    _cat("import_type", "Import type code"),
    _cat("import_use", "Import use code"),
    _cat("payment_type", "Payment type code"),
    _cat("transport_mode", "Mode of transport code"),
    _cat("declarant_id", "Declarant (customs broker) id"),
    _cat("importer_id", "Importer id"),
    _cat("seller_id", "Foreign seller id", nullable=True),
    _cat("courier_id", "Express courier id", nullable=True),
    Column("hs6", "str", checks=(pa.Check.str_matches(HS6_PATTERN, error="must be 6 digits"),),
           description="Harmonized System 6-digit code"),
    Column("country_departure", "str", checks=COUNTRY, description="Country of departure"),
    Column("country_origin", "str", checks=COUNTRY, description="Declared country of origin"),
    Column("tax_rate", "float", checks=NON_NEGATIVE, description="Tariff rate in percent"),
    _cat("tax_type", "Tariff type"),
    _cat("origin_indicator", "Country-of-origin indicator"),
    Column("net_mass", "float", checks=NON_NEGATIVE, description="Net mass in kg"),
    Column("item_price", "float", checks=NON_NEGATIVE, description="Declared item price"),
    Column("fraud", "int", required=False, nullable=True, checks=BINARY, description="Label: fraud found"),
    Column("critical_fraud", "int", required=False, nullable=True,
           checks=(pa.Check.isin([0, 1, 2], error="must be 0, 1 or 2"),), description="Label: severity"),
    Column("revenue", "float", required=False, nullable=True, checks=NON_NEGATIVE,
           description="Duty recovered by inspecting this declaration"),
    Column("typology", "str", required=False, nullable=True,
           description="Ground-truth planted typology (synthetic data only; never a feature)"),
)

TRANSACTION_COLUMNS: tuple[Column, ...] = (
    Column("transaction_id", "str", unique=True, description="Transfer id"),
    Column("timestamp", "datetime", description="Time of the transfer"),
    _cat("source_account", "Sending account"),
    _cat("target_account", "Receiving account"),
    Column("amount", "float", checks=NON_NEGATIVE, description="Amount in currency units"),
    Column("currency", "str", checks=(pa.Check.str_matches(r"^[A-Z]{3}$", error="must be a 3-letter code"),),
           description="ISO currency"),
    _cat("channel", "Channel (wire, cash, card, mobile...)"),
    Column("source_country", "str", checks=COUNTRY, description="Country of the sending account"),
    Column("target_country", "str", checks=COUNTRY, description="Country of the receiving account"),
    Column("is_laundering", "int", required=False, nullable=True, checks=BINARY,
           description="Label: part of a laundering pattern"),
    Column("typology", "str", required=False, nullable=True,
           description="Ground-truth planted typology (synthetic data only; never a feature)"),
)

ACCOUNT_COLUMNS: tuple[Column, ...] = (
    Column("account_id", "str", unique=True, description="Account id"),
    Column("country", "str", checks=COUNTRY, description="Account's country"),
    Column("opened_at", "datetime", required=False, nullable=True, description="Account opening time"),
    Column("init_balance", "float", required=False, nullable=True, description="Opening balance"),
    Column("is_fraud", "int", required=False, nullable=True, checks=BINARY, description="Account label"),
)

CASE_COLUMNS: tuple[Column, ...] = (
    Column("case_id", "str", unique=True, description="Case id"),
    Column("entity_kind", "str", checks=(pa.Check.isin(list(ENTITY_KINDS)),), description="Kind of entity"),
    Column("entity_id", "str", description="Entity the case is about"),
    Column("opened_at", "datetime", description="When the case was opened"),
    Column("closed_at", "datetime", description="When the outcome became known"),
    Column("outcome", "str", checks=(pa.Check.isin(list(CASE_OUTCOMES)),), description="confirmed or cleared"),
    Column("source", "str", required=False, nullable=True, description="derived, reviewer, import..."),
    Column("note", "str", required=False, nullable=True, description="Reviewer note"),
)

TABLES: dict[str, tuple[Column, ...]] = {
    "declarations": DECLARATION_COLUMNS,
    "transactions": TRANSACTION_COLUMNS,
    "accounts": ACCOUNT_COLUMNS,
    "cases": CASE_COLUMNS,
}

_DTYPES = {"str": "string", "datetime": "datetime64[ns]", "float": "float64", "int": "Int8"}


def pandera_schema(table: str) -> pa.DataFrameSchema:
    """The pandera schema of a contract table (types, checks, uniqueness)."""
    columns = {
        c.name: pa.Column(
            _DTYPES[c.kind], checks=list(c.checks), nullable=c.nullable, unique=c.unique, required=c.required
        )
        for c in TABLES[table]
    }
    return pa.DataFrameSchema(columns, strict=False, coerce=False, name=table)


def _rows(mask: np.ndarray | pd.Series, limit: int = 5) -> str:
    idx = np.flatnonzero(np.asarray(mask))
    shown = ", ".join(str(i + 1) for i in idx[:limit])
    return f"row {shown}" + (f" and {len(idx) - limit} more" if len(idx) > limit else "")


_ISO_DAY = r"\d{4}-\d{2}-\d{2}"
_ISO_CLOCK = r"[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?"
_OFFSET = r"(?:Z|[+-]\d{2}(?::?\d{2})?)"


def _parse_times(raw: pd.Series, empty: pd.Series, col: Column, problems: list[str]) -> pd.Series:
    """ISO 8601 dates and times (naive = UTC, offsets converted to UTC). Other forms are refused rather than
    guessed: ``05/03/2020`` is 5 March or 3 May depending on the file's country."""
    text = raw.mask(empty, None)
    if col.day:
        return _parse_days(text, empty, col, problems)
    iso = text.str.fullmatch(f"{_ISO_DAY}(?:{_ISO_CLOCK}{_OFFSET}?)?").fillna(True).astype(bool)
    if not iso.all():
        problems.append(f"{_rows(~iso)}, column '{col.name}': unparsable date {text[~iso].iloc[0]!r} "
                        "(use ISO 8601: 2020-03-05 or 2020-03-05T14:30:00, optionally with a UTC offset)")
        return pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns]")
    aware = text.str.fullmatch(f"{_ISO_DAY}{_ISO_CLOCK}{_OFFSET}").fillna(False).astype(bool)
    if aware.any() and not (aware | empty).all():
        problems.append(f"{_rows(~aware & ~empty)}, column '{col.name}': time without a UTC offset among times "
                        f"with one ({text[~aware & ~empty].iloc[0]!r}); give every time an offset, or none")
        return pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns]")
    parsed = pd.to_datetime(text, errors="coerce", format="ISO8601", utc=bool(aware.any()))
    bad = parsed.isna() & ~empty
    if bad.any():
        problems.append(f"{_rows(bad)}, column '{col.name}': unparsable date {raw[bad].iloc[0]!r}")
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed.astype("datetime64[ns]")


def _parse_days(text: pd.Series, empty: pd.Series, col: Column, problems: list[str]) -> pd.Series:
    """Calendar days: the date as written, as the scoring API reads it (a UTC offset does not move the day: a
    declaration dated 25 June in its office is dated 25 June); any time of day other than midnight is refused."""
    day = text.str.fullmatch(f"{_ISO_DAY}(?:[T ]00:00(?::00(?:\\.0+)?)?{_OFFSET}?)?").fillna(True).astype(bool)
    if not day.all():
        problems.append(f"{_rows(~day)}, column '{col.name}': {text[~day].iloc[0]!r} is not a date "
                        "(a calendar day in ISO 8601, e.g. 2020-03-05; no time of day)")
        return pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns]")
    parsed = pd.to_datetime(text.str.slice(0, 10), errors="coerce", format="%Y-%m-%d")
    bad = parsed.isna() & ~empty
    if bad.any():
        problems.append(f"{_rows(bad)}, column '{col.name}': unparsable date {text[bad].iloc[0]!r}")
    return parsed.astype("datetime64[ns]")


def _parse(series: pd.Series, col: Column, problems: list[str]) -> pd.Series:
    raw = series.astype("string").str.strip()
    empty = raw.isna() | (raw == "")
    if not col.nullable and empty.any():
        problems.append(f"{_rows(empty)}, column '{col.name}': missing value")
    if col.kind == "str":
        return raw.mask(empty, pd.NA)
    if col.kind == "datetime":
        return _parse_times(raw, empty, col, problems)
    parsed = pd.to_numeric(raw.mask(empty, None), errors="coerce")
    bad = parsed.isna() & ~empty
    if bad.any():
        problems.append(f"{_rows(bad)}, column '{col.name}': not a number ({raw[bad].iloc[0]!r})")
    if col.kind == "float":
        parsed = parsed.astype("float64") + 0.0  # "-0" is 0 (one value for keys and hashes)
        inf = np.isinf(parsed.to_numpy())
        if inf.any():
            problems.append(f"{_rows(inf)}, column '{col.name}': infinite value")
        return parsed
    frac = parsed.notna() & (parsed != parsed.round())
    if frac.any():
        problems.append(f"{_rows(frac)}, column '{col.name}': not a whole number")
        return parsed.astype("Float64")
    peak = parsed.abs().max(skipna=True)
    small = pd.isna(peak) or peak < 128  # all missing (or empty): the narrow type
    return parsed.astype("Int64").astype("Int8") if small else parsed.astype("Int64")


def parse_table(raw: pd.DataFrame, table: str, source: str) -> pd.DataFrame:
    """Convert a raw frame into the contract's types and validate it; raise on any problem.

    Extra columns are kept as they are; the result has the same number of rows as ``raw``.
    """
    problems: list[str] = []
    cols = TABLES[table]
    missing = [c.name for c in cols if c.required and c.name not in raw.columns]
    if missing:
        raise DataValidationError(source, [f"missing required column(s): {', '.join(missing)}"])
    out = raw.reset_index(drop=True).copy()
    for col in cols:
        if col.name in out.columns:
            out[col.name] = _parse(out[col.name], col, problems)
    if problems:
        raise DataValidationError(source, problems)
    validate_table(out, table, source)
    return out


def validate_table(df: pd.DataFrame, table: str, source: str) -> pd.DataFrame:
    """Validate an already-typed frame against the contract (used on load and before training)."""
    try:
        pandera_schema(table).validate(df, lazy=True)
    except pa.errors.SchemaErrors as err:
        raise DataValidationError(source, _describe(err.failure_cases)) from None
    return df


def _describe(failures: pd.DataFrame) -> list[str]:
    problems = []
    for (column, check), group in failures.groupby(["column", "check"], dropna=False, sort=False):
        rows = sorted(int(i) + 1 for i in group["index"].dropna().tolist())
        more = f" (+{len(rows) - 5:,} more)" if len(rows) > 5 else ""
        where = f"row {', '.join(map(str, rows[:5]))}{more}" if rows else "table"
        value = group["failure_case"].iloc[0]
        value = value.item() if hasattr(value, "item") else value  # numpy scalars print as plain numbers
        check = str(check)
        reason = "duplicate id" if "unique" in check or "duplicate" in check else check
        problems.append(f"{where}, column '{column}': {reason} (value {value!r})")
    return problems


def describe_contracts() -> str:
    """Markdown tables of every contract (used by README and `riskscore features --help`)."""
    lines = []
    for table, cols in TABLES.items():
        lines += [f"### {table}", "", "| column | type | required | description |", "|---|---|---|---|"]
        for c in cols:
            req = "yes" if c.required else "optional"
            lines.append(f"| `{c.name}` | {c.kind}{' (nullable)' if c.nullable else ''} | {req} | {c.description} |")
        lines.append("")
    return "\n".join(lines)

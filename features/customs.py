"""Customs declaration features: entity history, case history, price norms, routes, learned risk.

All aggregates look strictly before the declaration date (see :mod:`features.engine`). Outcomes count
from their closing date (cases) or the declaration date plus the label delay (labelled declarations).

Learned risk covers broad groups (origin, route, HS6, HS chapter, office, tariff type), entities and exact
declared values (the same price, HS6 x price, price x mass: repeated consignments), each as a rate smoothed
towards a fixed prior plus, for exact values, how many earlier outcomes it rests on. Counts and ages that
would only grow with the length of the history are windowed (30/90 days) or capped, so the model sees the
same distributions in training and in later windows; the exception is those outcome counts of exact values
(``seen_*``), which grow with the history of outcomes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from features.engine import Agg, Distinct, float_values, text_values, to_seconds
from features.featureset import T_COL, Columns, FeatureDef, FeatureSet, rows_where

DAY = 86_400
DAYS_30 = pd.Timedelta(days=30)
DAYS_90 = pd.Timedelta(days=90)
AGE_CAP_DAYS = 90.0  # ages are capped: an uncapped age grows with the history and shifts between windows
SMOOTHING = 20.0  # pseudo-count pulling learned risk rates of broad groups towards the prior
EXACT_SMOOTHING = 2.0  # pseudo-count of entity and exact-value rates (few, very specific outcomes)
# Fixed prior of every smoothed rate. A constant (not the expanding overall rate) keeps a rate's meaning the
# same at every point in time, so train and later windows see one distribution.
PRIOR = 0.2

CATEGORICAL_LABELS = {  # the declaration's own categorical fields, as a reviewer reads them
    "office_id": "Customs office", "process_type": "Clearance process type", "import_type": "Import type",
    "import_use": "Import use", "payment_type": "Payment type", "transport_mode": "Mode of transport",
    "tax_type": "Tariff type", "origin_indicator": "Country-of-origin indicator", "country_origin": "Country of origin",
    "country_departure": "Country of departure", "hs2": "HS chapter (2 digits)",
}
CATEGORICAL = tuple(CATEGORICAL_LABELS)


def prepare_columns(decl: Columns) -> dict[str, np.ndarray]:
    """Row-wise columns of declarations (no history needed), from a frame or plain column arrays."""
    out: dict[str, np.ndarray] = {}
    for col in (*CATEGORICAL[:-1], "declarant_id", "importer_id", "seller_id", "courier_id", "hs6"):
        out[col] = text_values(decl[col])
    out["hs2"] = np.array([h[:2] if h else None for h in out["hs6"]], dtype=object)
    out["hs4"] = np.array([h[:4] if h else None for h in out["hs6"]], dtype=object)
    price = float_values(decl["item_price"])
    mass = float_values(decl["net_mass"])
    out["tax_rate"] = float_values(decl["tax_rate"])
    out["log_price"] = np.log1p(price)
    out["log_mass"] = np.log1p(mass)
    priced = (price > 0) & (mass > 0)  # a unit price needs both (NaN compares False)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["log_unit_price"] = np.where(  # a difference of logs: a ratio of extreme values overflows
            priced, np.log(np.where(priced, price, 1.0)) - np.log(np.where(priced, mass, 1.0)), np.nan)
    out["log_unit_price_sq"] = out["log_unit_price"] ** 2
    out["priced"] = priced.astype(np.float64)
    out["price_key"] = np.where(price > 0, out["log_price"], np.nan)  # exact-value keys: a zero price is none
    out["route_differs"] = (out["country_departure"] != out["country_origin"]).astype(np.float64)
    out["has_courier"] = np.array([v is not None for v in out["courier_id"]], dtype=np.float64)
    out["has_seller"] = np.array([v is not None for v in out["seller_id"]], dtype=np.float64)
    t = to_seconds(decl["date"])
    out["weekday"] = ((t // DAY + 3) % 7).astype(np.float64)
    out["fraud"] = float_values(decl["fraud"]) if "fraud" in decl else np.full(len(t), np.nan)
    out["all"] = np.full(len(t), "all", dtype=object)
    out[T_COL] = t
    return out


def sources(events=None, labels=None, cases=None) -> dict[str, pd.DataFrame]:
    """Time-stamped tables the specs aggregate over (row-wise transforms of the inputs only)."""
    out: dict[str, pd.DataFrame] = {}
    if events is not None:
        out["events"] = events
        out["events:priced"] = priced(events)
    if labels is not None:
        out["labels"] = labels
    if cases is not None:
        c = pd.DataFrame({
            "entity_kind": cases["entity_kind"].astype("string"),
            "entity_id": cases["entity_id"].astype("string"),
            "confirmed": (cases["outcome"] == "confirmed").astype(float).to_numpy(),
            T_COL: to_seconds(cases["closed_at"]),
        })
        for kind in ("importer", "declarant", "seller"):
            out[f"cases:{kind}"] = c[c["entity_kind"] == kind]
    return out


def priced(events: Columns) -> Columns:
    """Prepared declarations with a unit price (positive price and mass): the rows price norms are made of."""
    return rows_where(events, np.asarray(events["priced"]) > 0)


def _entity(name: str, col: str) -> list:
    return [
        Agg(name, "events", (col,), values=("log_price",), recency=True),
        Agg(f"{name}_30d", "events", (col,), window=DAYS_30),
        Agg(f"{name}_90d", "events", (col,), window=DAYS_90),
        Agg(f"{name}_case", f"cases:{name}", ("entity_id",), query_keys=(col,), values=("confirmed",)),
        Agg(f"{name}_case_90d", f"cases:{name}", ("entity_id",), query_keys=(col,), values=("confirmed",),
            window=DAYS_90),
    ]


def _learned(name: str, keys: tuple[str, ...]) -> Agg:
    return Agg(f"risk_{name}", "labels", keys, values=("fraud",))


# Exact-value keys of learned rates: (name, prepared columns, human-readable text).
EXACT = (  # price_key: the declared price when it is positive (every zero price is not one consignment)
    ("price", ("price_key",), "same declared price"),
    ("hs6_price", ("hs6", "price_key"), "same HS6 code and declared price"),
    ("price_mass", ("price_key", "log_mass"), "same declared price and net mass"),
)


SPECS = [
    *_entity("importer", "importer_id"),
    *_entity("declarant", "declarant_id"),
    *_entity("seller", "seller_id"),
    Agg("courier_30d", "events", ("courier_id",), window=DAYS_30),
    Distinct("importer_hs6", "events", ("importer_id",), "hs6", window=DAYS_90),
    Distinct("importer_sellers", "events", ("importer_id",), "seller_id", window=DAYS_90),
    Distinct("importer_declarants", "events", ("importer_id",), "declarant_id", window=DAYS_90),
    Distinct("seller_importers", "events", ("seller_id",), "importer_id", window=DAYS_90),
    Agg("importer_hs6_hist", "events", ("importer_id", "hs6")),
    # unit-price norms and history: only declarations with a unit price
    Agg("importer_hs6_price", "events:priced", ("importer_id", "hs6"), values=("log_unit_price",)),
    Agg("norm_hs6", "events:priced", ("hs6",), values=("log_unit_price", "log_unit_price_sq")),
    Agg("norm_hs6_origin", "events:priced", ("hs6", "country_origin"),
        values=("log_unit_price", "log_unit_price_sq")),
    Agg("norm_hs4", "events:priced", ("hs4",), values=("log_unit_price", "log_unit_price_sq")),
    Agg("norm_hs6_90d", "events", ("hs6",), window=DAYS_90),
    Agg("norm_hs6_origin_90d", "events", ("hs6", "country_origin"), window=DAYS_90),
    Agg("norm_hs4_90d", "events", ("hs4",), window=DAYS_90),
    _learned("origin", ("country_origin",)),
    _learned("route", ("country_departure", "country_origin")),
    _learned("hs6", ("hs6",)),
    _learned("hs2", ("hs2",)),
    _learned("office", ("office_id",)),
    _learned("importer", ("importer_id",)),
    _learned("declarant", ("declarant_id",)),
    _learned("seller", ("seller_id",)),
    _learned("tax_type", ("tax_type",)),
    # outcomes of earlier declarations with exactly the same declared values (repeated consignments)
    *(_learned(name, keys) for name, keys, _text in EXACT),
]


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _rate(num: np.ndarray, den: np.ndarray, m: float = SMOOTHING) -> np.ndarray:
    """Rate of ``num`` outcomes in ``den`` trials, smoothed towards the fixed :data:`PRIOR`."""
    return (num + PRIOR * m) / (den + m)


def _price_z(f: Mapping[str, np.ndarray], norm: str) -> tuple[np.ndarray, np.ndarray]:
    n = f[f"{norm}_n"]
    mean = _div(f[f"{norm}_log_unit_price"], n)
    var = _div(f[f"{norm}_log_unit_price_sq"], n) - mean**2
    std = np.sqrt(np.clip(var, 0.0, None)) + 0.25
    dev = f["log_unit_price"] - mean
    return dev, dev / std


def derive(f: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Model inputs from a declaration's own columns and its point-in-time aggregates."""
    out = {col: f[col] for col in CATEGORICAL}
    for col in ("tax_rate", "log_price", "log_mass", "log_unit_price", "route_differs", "has_courier",
                "has_seller", "weekday"):
        out[col] = f[col]
    for ent in ("importer", "declarant", "seller"):
        out[f"{ent}_count_30d"] = f[f"{ent}_30d_n"]
        out[f"{ent}_count_90d"] = f[f"{ent}_90d_n"]
        out[f"{ent}_days_since_first"] = np.minimum(f[f"{ent}_since_first"] / DAY, AGE_CAP_DAYS)
        out[f"{ent}_days_since_last"] = np.minimum(f[f"{ent}_since_last"] / DAY, AGE_CAP_DAYS)
        out[f"{ent}_price_vs_history"] = f["log_price"] - _div(f[f"{ent}_log_price"], f[f"{ent}_n"])
        out[f"{ent}_cases_90d"] = f[f"{ent}_case_90d_n"]
        out[f"{ent}_confirmed_cases_90d"] = f[f"{ent}_case_90d_confirmed"]
        out[f"{ent}_fraud_rate"] = _rate(f[f"{ent}_case_confirmed"], f[f"{ent}_case_n"], m=EXACT_SMOOTHING)
        out[f"{ent}_label_rate"] = _rate(f[f"risk_{ent}_fraud"], f[f"risk_{ent}_n"], m=EXACT_SMOOTHING)
    out["courier_count_30d"] = f["courier_30d_n"]
    out["importer_distinct_hs6_90d"] = f["importer_hs6"]
    out["importer_distinct_sellers_90d"] = f["importer_sellers"]
    out["importer_distinct_declarants_90d"] = f["importer_declarants"]
    out["seller_distinct_importers_90d"] = f["seller_importers"]
    out["importer_new_hs6"] = (f["importer_hs6_hist_n"] == 0).astype(np.float64)
    out["unit_price_vs_own_history"] = f["log_unit_price"] - _div(
        f["importer_hs6_price_log_unit_price"], f["importer_hs6_price_n"])
    for norm, label in (("norm_hs6", "hs6"), ("norm_hs6_origin", "hs6_origin"), ("norm_hs4", "hs4")):
        dev, z = _price_z(f, norm)
        out[f"unit_price_dev_{label}"] = dev
        out[f"unit_price_z_{label}"] = z
        out[f"{label}_count_90d"] = f[f"{norm}_90d_n"]
    for name in ("origin", "route", "hs6", "hs2", "office", "tax_type"):
        out[f"risk_{name}"] = _rate(f[f"risk_{name}_fraud"], f[f"risk_{name}_n"])
    for name, _keys, _text in EXACT:
        out[f"risk_{name}"] = _rate(f[f"risk_{name}_fraud"], f[f"risk_{name}_n"], m=EXACT_SMOOTHING)
        out[f"seen_{name}"] = f[f"risk_{name}_n"]
    return out


FEATURES = [
    *(FeatureDef(c, label, categorical=True) for c, label in CATEGORICAL_LABELS.items()),
    FeatureDef("tax_rate", "Tariff rate (%)"),
    FeatureDef("log_price", "Declared price (log)"),
    FeatureDef("log_mass", "Net mass (log kg)"),
    FeatureDef("log_unit_price", "Unit price (log of price per kg; missing without a positive price and mass)"),
    FeatureDef("route_differs", "Departure country differs from origin"),
    FeatureDef("has_courier", "Shipped by express courier"),
    FeatureDef("has_seller", "Seller declared"),
    FeatureDef("weekday", "Day of week"),
    *(
        FeatureDef(f"{ent}_{suffix}", f"{ent.capitalize()}: {text}")
        for ent in ("importer", "declarant", "seller")
        for suffix, text in (
            ("count_30d", "declarations in the last 30 days"),
            ("count_90d", "declarations in the last 90 days"),
            ("days_since_first", f"days since first seen (capped at {AGE_CAP_DAYS:.0f})"),
            ("days_since_last", f"days since previous declaration (capped at {AGE_CAP_DAYS:.0f})"),
            ("price_vs_history", "price vs own average (log)"),
            ("cases_90d", "cases closed in the last 90 days"),
            ("confirmed_cases_90d", "confirmed fraud cases closed in the last 90 days"),
            ("fraud_rate", "confirmed-case rate (smoothed)"),
            ("label_rate", "inspection fraud rate (smoothed)"),
        )
    ),
    FeatureDef("courier_count_30d", "Courier: declarations in the last 30 days"),
    FeatureDef("importer_distinct_hs6_90d", "Importer: HS6 codes first declared in the last 90 days"),
    FeatureDef("importer_distinct_sellers_90d", "Importer: sellers first used in the last 90 days"),
    FeatureDef("importer_distinct_declarants_90d", "Importer: declarants first used in the last 90 days"),
    FeatureDef("seller_distinct_importers_90d", "Seller: importers first supplied in the last 90 days"),
    FeatureDef("importer_new_hs6", "First time this importer declares this HS6"),
    FeatureDef("unit_price_vs_own_history", "Unit price vs importer's own history for this HS6 (log)"),
    *(
        FeatureDef(f"{prefix}_{label}", f"{text} {label.replace('_', ' x ').upper()}")
        for label in ("hs6", "hs6_origin", "hs4")
        for prefix, text in (
            ("unit_price_dev", "Unit price deviation (log) from norm of"),
            ("unit_price_z", "Unit price z-score vs norm of"),
        )
    ),
    *(FeatureDef(f"{label}_count_90d", f"Declarations of same {label.replace('_', ' x ').upper()} in the last 90 days")
      for label in ("hs6", "hs6_origin", "hs4")),
    FeatureDef("risk_origin", "Learned fraud rate of origin country", learned_rate=True),
    FeatureDef("risk_route", "Learned fraud rate of departure→origin route", learned_rate=True),
    FeatureDef("risk_hs6", "Learned fraud rate of HS6 code"),
    FeatureDef("risk_hs2", "Learned fraud rate of HS chapter", learned_rate=True),
    FeatureDef("risk_office", "Learned fraud rate of customs office", learned_rate=True),
    FeatureDef("risk_tax_type", "Learned fraud rate of tariff type", learned_rate=True),
    *(
        FeatureDef(f"{prefix}_{name}", f"{head} {text}")
        for name, _keys, text in EXACT
        for prefix, head in (
            ("risk", "Learned fraud rate of earlier declarations with the"),
            ("seen", "Inspected earlier declarations with the"),
        )
    ),
]


def feature_set(label_delay_days: float = 0.0) -> FeatureSet:
    """The customs feature set (label delay: days from declaration until its inspection outcome is known)."""
    return FeatureSet(
        domain="customs", id_col="declaration_id", time_col="date", label_col="fraud",
        entity_cols=("importer_id", "declarant_id", "seller_id"),
        prepare_columns=prepare_columns, sources=sources, specs=SPECS, derive=derive, features=FEATURES,
        version="customs-3",  # 3: unit price = price / kg, norms only over priced declarations, no zero-price key
        label_delay=pd.Timedelta(days=label_delay_days),
    )

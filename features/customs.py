"""Customs declaration features: entity history, case history, price norms, routes, learned risk.

All aggregates look strictly before the declaration date (see :mod:`features.engine`). Outcomes count
from their closing date (cases) or the declaration date plus the label delay (labelled declarations).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from features.engine import Agg, Distinct, to_seconds
from features.featureset import T_COL, FeatureDef, FeatureSet

DAY = 86_400
DAYS_30 = pd.Timedelta(days=30)
SMOOTHING = 20.0  # pseudo-count pulling learned risk rates towards the overall rate

CATEGORICAL = (
    "office_id", "process_type", "import_type", "import_use", "payment_type", "transport_mode",
    "tax_type", "origin_indicator", "country_origin", "country_departure", "hs2",
)


def _text(values: pd.Series) -> np.ndarray:
    """Object array of strings with None for missing values."""
    arr = values.to_numpy(dtype=object, na_value=None)
    return arr


def prepare(decl: pd.DataFrame) -> pd.DataFrame:
    """Row-wise columns of a declaration (no history needed)."""
    out: dict[str, np.ndarray] = {}
    for col in (*CATEGORICAL[:-1], "declarant_id", "importer_id", "seller_id", "courier_id", "hs6"):
        out[col] = _text(decl[col])
    out["hs2"] = np.array([h[:2] if h else None for h in out["hs6"]], dtype=object)
    out["hs4"] = np.array([h[:4] if h else None for h in out["hs6"]], dtype=object)
    price = decl["item_price"].to_numpy(np.float64)
    mass = decl["net_mass"].to_numpy(np.float64)
    out["tax_rate"] = decl["tax_rate"].to_numpy(np.float64)
    out["log_price"] = np.log1p(price)
    out["log_mass"] = np.log1p(mass)
    out["log_unit_price"] = out["log_price"] - out["log_mass"]
    out["log_unit_price_sq"] = out["log_unit_price"] ** 2
    out["route_differs"] = (out["country_departure"] != out["country_origin"]).astype(np.float64)
    out["has_courier"] = np.array([v is not None for v in out["courier_id"]], dtype=np.float64)
    out["has_seller"] = np.array([v is not None for v in out["seller_id"]], dtype=np.float64)
    t = to_seconds(decl["date"])
    out["weekday"] = ((t // DAY + 3) % 7).astype(np.float64)
    out["fraud"] = decl["fraud"].to_numpy(np.float64, na_value=np.nan) if "fraud" in decl else np.full(len(t), np.nan)
    out["all"] = np.full(len(t), "all", dtype=object)
    out[T_COL] = t
    return pd.DataFrame(out, index=decl.index)


def sources(events=None, labels=None, cases=None) -> dict[str, pd.DataFrame]:
    """Time-stamped tables the specs aggregate over (row-wise transforms of the inputs only)."""
    out: dict[str, pd.DataFrame] = {}
    if events is not None:
        out["events"] = events
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


def _entity(name: str, col: str) -> list:
    return [
        Agg(name, "events", (col,), values=("log_price",), recency=True),
        Agg(f"{name}_30d", "events", (col,), window=DAYS_30),
        Agg(f"{name}_case", f"cases:{name}", ("entity_id",), query_keys=(col,), values=("confirmed",)),
    ]


def _learned(name: str, keys: tuple[str, ...]) -> Agg:
    return Agg(f"risk_{name}", "labels", keys, values=("fraud",))


SPECS = [
    *_entity("importer", "importer_id"),
    *_entity("declarant", "declarant_id"),
    *_entity("seller", "seller_id"),
    Agg("courier", "events", ("courier_id",)),
    Distinct("importer_hs6", "events", ("importer_id",), "hs6"),
    Distinct("importer_sellers", "events", ("importer_id",), "seller_id"),
    Distinct("importer_declarants", "events", ("importer_id",), "declarant_id"),
    Distinct("seller_importers", "events", ("seller_id",), "importer_id"),
    Agg("importer_hs6_hist", "events", ("importer_id", "hs6"), values=("log_unit_price",)),
    Agg("norm_hs6", "events", ("hs6",), values=("log_unit_price", "log_unit_price_sq")),
    Agg("norm_hs6_origin", "events", ("hs6", "country_origin"), values=("log_unit_price", "log_unit_price_sq")),
    Agg("norm_hs4", "events", ("hs4",), values=("log_unit_price", "log_unit_price_sq")),
    _learned("all", ("all",)),
    _learned("origin", ("country_origin",)),
    _learned("route", ("country_departure", "country_origin")),
    _learned("hs6", ("hs6",)),
    _learned("hs2", ("hs2",)),
    _learned("office", ("office_id",)),
    _learned("importer", ("importer_id",)),
    _learned("declarant", ("declarant_id",)),
    _learned("seller", ("seller_id",)),
    _learned("tax_type", ("tax_type",)),
]


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _rate(num: np.ndarray, den: np.ndarray, prior: np.ndarray, m: float = SMOOTHING) -> np.ndarray:
    return (num + prior * m) / (den + m)


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
        out[f"{ent}_prior_count"] = f[f"{ent}_n"]
        out[f"{ent}_count_30d"] = f[f"{ent}_30d_n"]
        out[f"{ent}_days_since_first"] = f[f"{ent}_since_first"] / DAY
        out[f"{ent}_days_since_last"] = f[f"{ent}_since_last"] / DAY
        out[f"{ent}_price_vs_history"] = f["log_price"] - _div(f[f"{ent}_log_price"], f[f"{ent}_n"])
        out[f"{ent}_cases"] = f[f"{ent}_case_n"]
        out[f"{ent}_confirmed_cases"] = f[f"{ent}_case_confirmed"]
    prior = (f["risk_all_fraud"] + 1.0) / (f["risk_all_n"] + 2.0)
    for ent in ("importer", "declarant", "seller"):
        out[f"{ent}_fraud_rate"] = _rate(f[f"{ent}_case_confirmed"], f[f"{ent}_case_n"], prior, m=2.0)
        out[f"{ent}_label_rate"] = _rate(f[f"risk_{ent}_fraud"], f[f"risk_{ent}_n"], prior, m=2.0)
    out["courier_prior_count"] = f["courier_n"]
    out["importer_distinct_hs6"] = f["importer_hs6"]
    out["importer_distinct_sellers"] = f["importer_sellers"]
    out["importer_distinct_declarants"] = f["importer_declarants"]
    out["seller_distinct_importers"] = f["seller_importers"]
    out["importer_new_hs6"] = (f["importer_hs6_hist_n"] == 0).astype(np.float64)
    out["unit_price_vs_own_history"] = f["log_unit_price"] - _div(
        f["importer_hs6_hist_log_unit_price"], f["importer_hs6_hist_n"])
    for norm, label in (("norm_hs6", "hs6"), ("norm_hs6_origin", "hs6_origin"), ("norm_hs4", "hs4")):
        dev, z = _price_z(f, norm)
        out[f"unit_price_dev_{label}"] = dev
        out[f"unit_price_z_{label}"] = z
        out[f"{label}_prior_count"] = f[f"{norm}_n"]
    for name in ("origin", "route", "hs6", "hs2", "office", "tax_type"):
        out[f"risk_{name}"] = _rate(f[f"risk_{name}_fraud"], f[f"risk_{name}_n"], prior)
    return out


FEATURES = [
    *(FeatureDef(c, c.replace("_", " ").capitalize(), categorical=True) for c in CATEGORICAL),
    FeatureDef("tax_rate", "Tariff rate (%)"),
    FeatureDef("log_price", "Declared price (log)"),
    FeatureDef("log_mass", "Net mass (log kg)"),
    FeatureDef("log_unit_price", "Unit price (log price per kg)"),
    FeatureDef("route_differs", "Departure country differs from origin"),
    FeatureDef("has_courier", "Shipped by express courier"),
    FeatureDef("has_seller", "Seller declared"),
    FeatureDef("weekday", "Day of week"),
    *(
        FeatureDef(f"{ent}_{suffix}", f"{ent.capitalize()}: {text}")
        for ent in ("importer", "declarant", "seller")
        for suffix, text in (
            ("prior_count", "earlier declarations"),
            ("count_30d", "declarations in the last 30 days"),
            ("days_since_first", "days since first seen"),
            ("days_since_last", "days since previous declaration"),
            ("price_vs_history", "price vs own average (log)"),
            ("cases", "closed cases"),
            ("confirmed_cases", "confirmed fraud cases"),
            ("fraud_rate", "confirmed-case rate (smoothed)"),
            ("label_rate", "inspection fraud rate (smoothed)"),
        )
    ),
    FeatureDef("courier_prior_count", "Courier: earlier declarations"),
    FeatureDef("importer_distinct_hs6", "Importer: distinct HS6 codes so far"),
    FeatureDef("importer_distinct_sellers", "Importer: distinct sellers so far"),
    FeatureDef("importer_distinct_declarants", "Importer: distinct declarants so far"),
    FeatureDef("seller_distinct_importers", "Seller: distinct importers so far"),
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
    *(FeatureDef(f"{label}_prior_count", f"Earlier declarations of same {label.replace('_', ' x ')}")
      for label in ("hs6", "hs6_origin", "hs4")),
    FeatureDef("risk_origin", "Learned fraud rate of origin country"),
    FeatureDef("risk_route", "Learned fraud rate of departure→origin route"),
    FeatureDef("risk_hs6", "Learned fraud rate of HS6 code"),
    FeatureDef("risk_hs2", "Learned fraud rate of HS chapter"),
    FeatureDef("risk_office", "Learned fraud rate of customs office"),
    FeatureDef("risk_tax_type", "Learned fraud rate of tariff type"),
]


def feature_set(label_delay_days: float = 0.0) -> FeatureSet:
    """The customs feature set (label delay: days from declaration until its inspection outcome is known)."""
    return FeatureSet(
        domain="customs", id_col="declaration_id", time_col="date", label_col="fraud",
        entity_cols=("importer_id", "declarant_id", "seller_id"),
        prepare=prepare, sources=sources, specs=SPECS, derive=derive, features=FEATURES, version="customs-1",
        label_delay=pd.Timedelta(days=label_delay_days),
    )

"""Small synthetic customs declarations built in-process for feature tests (no other module needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def declarations(n: int = 1500, seed: int = 0) -> pd.DataFrame:
    """Declarations in the contract's dtypes with repeated entities and a few frauds."""
    rng = np.random.default_rng(seed)
    dates = pd.Timestamp("2021-01-01") + pd.to_timedelta(np.sort(rng.integers(0, 120, n)), unit="D")
    pick = lambda prefix, k, p=None: pd.array([f"{prefix}{i}" for i in rng.choice(k, n, p=p)], dtype="string")  # noqa: E731
    hs = pd.array([f"{h:06d}" for h in rng.choice([392690, 950300, 71080, 620822, 440890], n)], dtype="string")
    countries = np.array(["CN", "US", "DE", "VN", "JP"])
    origin = countries[rng.integers(0, 5, n)]
    departure = np.where(rng.random(n) < 0.8, origin, countries[rng.integers(0, 5, n)])
    seller = pick("S", 40)
    seller[rng.random(n) < 0.1] = pd.NA
    courier = pick("C", 3)
    courier[rng.random(n) < 0.7] = pd.NA
    frame = pd.DataFrame({
        "declaration_id": pd.array([f"D{i:05d}" for i in range(n)], dtype="string"),
        "date": dates.astype("datetime64[ns]"),
        "office_id": pick("O", 4), "process_type": pick("P", 2), "import_type": pick("I", 3),
        "import_use": pick("U", 2), "payment_type": pick("Y", 3), "transport_mode": pick("M", 2),
        "declarant_id": pick("DC", 30), "importer_id": pick("IM", 200), "seller_id": seller, "courier_id": courier,
        "hs6": hs, "country_departure": pd.array(departure, dtype="string"),
        "country_origin": pd.array(origin, dtype="string"),
        "tax_rate": rng.choice([0.0, 5.2, 8.0], n), "tax_type": pick("T", 4), "origin_indicator": pick("G", 3),
        "net_mass": rng.lognormal(5, 1, n), "item_price": rng.lognormal(10, 1, n),
        "fraud": pd.array((rng.random(n) < 0.1).astype(int), dtype="Int8"),
    })
    # repeated consignments: a third of the rows re-declare the exact price (half also the mass) of a pool
    # row, so exact-value features have history (separate stream: the columns above stay as they were)
    rep = np.random.default_rng([seed, 1])
    pool = rep.choice(n, 60, replace=False)
    again = np.flatnonzero(rep.random(n) < 1 / 3)
    src = rep.choice(pool, len(again))
    frame.loc[again, "item_price"] = frame["item_price"].to_numpy()[src]
    same_mass = rep.random(len(again)) < 0.5
    frame.loc[again[same_mass], "net_mass"] = frame["net_mass"].to_numpy()[src[same_mass]]
    return frame


def cases_from(decl: pd.DataFrame, delay_days: float = 0.0) -> pd.DataFrame:
    """Importer/declarant cases of labelled declarations, closed ``delay_days`` after the declaration."""
    parts = []
    for kind, col in (("importer", "importer_id"), ("declarant", "declarant_id"), ("seller", "seller_id")):
        rows = decl[decl[col].notna()]
        parts.append(pd.DataFrame({
            "case_id": kind + ":" + rows["declaration_id"].astype(str),
            "entity_kind": kind, "entity_id": rows[col].astype(str), "opened_at": rows["date"],
            "closed_at": rows["date"] + pd.Timedelta(days=delay_days),
            "outcome": np.where(rows["fraud"] == 1, "confirmed", "cleared"),
        }))
    return pd.concat(parts, ignore_index=True)

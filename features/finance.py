"""Transfer (AML) features: velocity, structuring, fan-in/out, pass-through, pairs, cycles, learned risk.

All aggregates look strictly before the transfer's timestamp (see :mod:`features.engine` and
:mod:`features.graph`). Outcomes count from their closing time (cases) or the transfer time plus the
label delay (labelled transfers). Sender = ``source_account``, receiver = ``target_account``.

A self-transfer (``A -> A``) moves no money between parties: it is in no history (velocity, fan-in/out,
pass-through, pairs, back edges, cycles, links), so it can neither pose as a 2-cycle (its own earlier
self-transfers as "back" transfers) nor inflate an account's in- and outflow at once. It is scored like any
transfer, with its ``self_transfer`` flag; its outcome still counts in the learned label rates.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from features.engine import Agg, Distinct, float_values, text_values, to_seconds
from features.featureset import T_COL, Columns, FeatureDef, FeatureSet, rows_where
from features.graph import ConfirmedLinks, Cycle

HOUR, DAY = 3_600, 86_400
SRC, DST = "source_account", "target_account"
THRESHOLD = 10_000.0  # cash/transfer reporting threshold
BAND_LOW = 8_000.0  # "just below the threshold" band: [8,000, 10,000)
SMOOTHING = 20.0  # pseudo-count pulling learned risk rates towards the overall rate
WINDOWS = {
    "1h": pd.Timedelta(hours=1), "24h": pd.Timedelta(hours=24), "7d": pd.Timedelta(days=7),
    "30d": pd.Timedelta(days=30),
}
WINDOW_TEXT = {"1h": "last hour", "24h": "last 24h", "7d": "last 7 days", "30d": "last 30 days"}
CATEGORICAL = ("currency", "channel", "source_country", "target_country")
ROW = ("log_amount", "below_threshold", "round_100", "round_1000", "cross_border", "self_transfer", "hour", "weekday")


def prepare_columns(tx: Columns) -> dict[str, np.ndarray]:
    """Row-wise columns of transfers (no history needed), from a frame or plain column arrays."""
    out: dict[str, np.ndarray] = {}
    for col in (SRC, DST, *CATEGORICAL):
        out[col] = text_values(tx[col])
    amount = float_values(tx["amount"])
    out["amount"] = amount
    out["log_amount"] = np.log1p(amount)
    out["below_threshold"] = ((amount >= BAND_LOW) & (amount < THRESHOLD)).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # a missing or huge amount is simply not round
        cents = np.round(amount * 100.0)
        out["round_100"] = ((cents % 10_000 == 0) & (cents > 0)).astype(np.float64)
        out["round_1000"] = ((cents % 100_000 == 0) & (cents > 0)).astype(np.float64)
    out["cross_border"] = (out["source_country"] != out["target_country"]).astype(np.float64)
    out["self_transfer"] = (out[SRC] == out[DST]).astype(np.float64)
    t = to_seconds(tx["timestamp"])
    out["hour"] = ((t % DAY) // HOUR).astype(np.float64)
    out["weekday"] = ((t // DAY + 3) % 7).astype(np.float64)  # 1970-01-01 was a Thursday
    out["is_laundering"] = float_values(tx["is_laundering"]) if "is_laundering" in tx else np.full(len(t), np.nan)
    out["all"] = np.full(len(t), "all", dtype=object)
    out[T_COL] = t
    return out


def between_accounts(events: Columns) -> Columns:
    """Prepared transfers without the self-transfers: the rows every history holds."""
    return rows_where(events, np.asarray(events["self_transfer"]) == 0)


def sources(events=None, labels=None, cases=None) -> dict[str, pd.DataFrame]:
    """Time-stamped tables the specs aggregate over (row-wise transforms of the inputs only)."""
    out: dict[str, pd.DataFrame] = {}
    if events is not None:
        out["events"] = between_accounts(events)
    if labels is not None:
        out["labels"] = labels
    if cases is not None:
        cases = cases[(cases["entity_kind"] == "account") & cases["closed_at"].notna()]
        out["cases:account"] = pd.DataFrame({
            "entity_id": cases["entity_id"].astype("string"),
            "confirmed": (cases["outcome"] == "confirmed").astype(float).to_numpy(),
            T_COL: to_seconds(cases["closed_at"]),
        }, index=cases.index)
    return out


def _flows(prefix: str, keys: tuple[str, ...], query: str, windows: tuple[str, ...]) -> list:
    """Windowed count/amount of transfers of ``keys`` looked up by the query row's ``query`` account."""
    return [Agg(f"{prefix}_{w}", "events", keys, query_keys=(query,), values=("amount",), window=WINDOWS[w])
            for w in windows]


SPECS = [
    # velocity in both directions of both parties (recency = account age and dwell time)
    Agg("src_out", "events", (SRC,), values=("amount", "log_amount"), recency=True),
    *_flows("src_out", (SRC,), SRC, ("1h", "24h", "7d")),
    Agg("src_out_30d", "events", (SRC,), values=("amount", "below_threshold", "round_100"), window=WINDOWS["30d"]),
    Agg("src_in", "events", (DST,), query_keys=(SRC,), values=("amount",), recency=True),
    *_flows("src_in", (DST,), SRC, ("24h", "7d")),
    Agg("dst_in", "events", (DST,), values=("amount",), recency=True),
    *_flows("dst_in", (DST,), DST, ("1h", "24h", "7d", "30d")),
    Agg("dst_out", "events", (SRC,), query_keys=(DST,), values=("amount",)),
    *_flows("dst_out", (SRC,), DST, ("24h",)),
    # distinct counterparties, overall and new in the last 7 days
    Distinct("src_fanout", "events", (SRC,), DST),
    Distinct("src_fanout_7d", "events", (SRC,), DST, window=WINDOWS["7d"]),
    Distinct("src_fanin", "events", (DST,), SRC, query_keys=(SRC,)),
    Distinct("dst_fanin", "events", (DST,), SRC),
    Distinct("dst_fanin_7d", "events", (DST,), SRC, window=WINDOWS["7d"]),
    Distinct("dst_fanout", "events", (SRC,), DST, query_keys=(DST,)),
    # pair history, back edge (2-cycle) and 3-cycles
    Agg("pair", "events", (SRC, DST), values=("amount",), recency=True),
    Agg("back", "events", (SRC, DST), query_keys=(DST, SRC), values=("amount",), recency=True),
    Cycle("cycle3", "events", (SRC, DST)),
    # learned risk from labelled transfers (known from transfer time + label delay)
    Agg("risk_all", "labels", ("all",), values=("is_laundering",)),
    Agg("risk_corridor", "labels", ("source_country", "target_country"), values=("is_laundering",)),
    Agg("risk_src_out", "labels", (SRC,), values=("is_laundering",)),
    Agg("risk_src_in", "labels", (DST,), query_keys=(SRC,), values=("is_laundering",)),
    Agg("risk_dst_in", "labels", (DST,), values=("is_laundering",)),
    Agg("risk_dst_out", "labels", (SRC,), query_keys=(DST,), values=("is_laundering",)),
    # case history of both parties and their links to confirmed accounts
    Agg("src_case", "cases:account", ("entity_id",), query_keys=(SRC,), values=("confirmed",)),
    Agg("dst_case", "cases:account", ("entity_id",), query_keys=(DST,), values=("confirmed",)),
    ConfirmedLinks("confirmed_links", (SRC, DST), ("src", "dst"), ("events", "cases:account"), (SRC, DST)),
]


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _rate(num: np.ndarray, den: np.ndarray, prior: np.ndarray, m: float) -> np.ndarray:
    return (num + prior * m) / (den + m)


def derive(f: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Model inputs from a transfer's own columns and its point-in-time aggregates."""
    out = {col: f[col] for col in (*CATEGORICAL, *ROW)}
    for side, direction, windows in (("src", "out", WINDOWS), ("src", "in", ("24h", "7d")),
                                     ("dst", "in", WINDOWS), ("dst", "out", ("24h",))):
        out[f"{side}_{direction}_count"] = f[f"{side}_{direction}_n"]
        for w in windows:
            out[f"{side}_{direction}_count_{w}"] = f[f"{side}_{direction}_{w}_n"]
            out[f"{side}_{direction}_amount_{w}"] = f[f"{side}_{direction}_{w}_amount"]
    out["src_days_since_first_out"] = f["src_out_since_first"] / DAY
    out["src_hours_since_last_out"] = f["src_out_since_last"] / HOUR
    out["src_hours_since_last_in"] = f["src_in_since_last"] / HOUR
    out["dst_days_since_first_in"] = f["dst_in_since_first"] / DAY
    out["dst_hours_since_last_in"] = f["dst_in_since_last"] / HOUR
    out["amount_vs_src_history"] = f["log_amount"] - _div(f["src_out_log_amount"], f["src_out_n"])
    out["src_below_threshold_count_30d"] = f["src_out_30d_below_threshold"]
    out["src_below_threshold_share_30d"] = _div(f["src_out_30d_below_threshold"], f["src_out_30d_n"])
    out["src_round_share_30d"] = _div(f["src_out_30d_round_100"], f["src_out_30d_n"])
    out["pass_through_24h"] = _div(f["src_out_24h_amount"] + f["amount"], f["src_in_24h_amount"])
    out["pass_through_7d"] = _div(f["src_out_7d_amount"] + f["amount"], f["src_in_7d_amount"])
    for col in ("src_fanout", "src_fanout_7d", "src_fanin", "dst_fanin", "dst_fanin_7d", "dst_fanout"):
        out[col] = f[col]
    out["pair_count"] = f["pair_n"]
    out["pair_amount"] = f["pair_amount"]
    out["new_counterparty"] = (f["pair_n"] == 0).astype(np.float64)
    out["pair_days_since_last"] = f["pair_since_last"] / DAY
    out["back_count"] = f["back_n"]
    out["back_amount"] = f["back_amount"]
    out["back_hours_since_last"] = f["back_since_last"] / HOUR
    out["cycle3_count"] = f["cycle3_n"]
    out["cycle3_hours_since_last"] = f["cycle3_since_last"] / HOUR
    prior = (f["risk_all_is_laundering"] + 1.0) / (f["risk_all_n"] + 2.0)
    out["risk_corridor"] = _rate(f["risk_corridor_is_laundering"], f["risk_corridor_n"], prior, SMOOTHING)
    for name in ("src_out", "src_in", "dst_in", "dst_out"):
        out[f"{name}_label_rate"] = _rate(f[f"risk_{name}_is_laundering"], f[f"risk_{name}_n"], prior, 2.0)
        out[f"{name}_labelled"] = f[f"risk_{name}_n"]
    for side in ("src", "dst"):
        out[f"{side}_cases"] = f[f"{side}_case_n"]
        out[f"{side}_confirmed_cases"] = f[f"{side}_case_confirmed"]
        out[f"{side}_confirmed_links"] = f[f"{side}_confirmed_links_1hop"]
        out[f"{side}_confirmed_links_2hop"] = f[f"{side}_confirmed_links_2hop"]
    return out


_SIDE = {"src": "Sender", "dst": "Receiver"}
_DIRECTION = {"out": ("outgoing transfers", "amount sent"), "in": ("incoming transfers", "amount received")}


def _flow_defs(side: str, direction: str, windows) -> list[FeatureDef]:
    count_text, amount_text = _DIRECTION[direction]
    defs = [FeatureDef(f"{side}_{direction}_count", f"{_SIDE[side]}: earlier {count_text}")]
    for w in windows:
        defs += [
            FeatureDef(f"{side}_{direction}_count_{w}", f"{_SIDE[side]}: {count_text} in {WINDOW_TEXT[w]}"),
            FeatureDef(f"{side}_{direction}_amount_{w}", f"{_SIDE[side]}: {amount_text} in {WINDOW_TEXT[w]}"),
        ]
    return defs


FEATURES = [
    FeatureDef("currency", "Currency", categorical=True),
    FeatureDef("channel", "Payment channel", categorical=True),
    FeatureDef("source_country", "Sender's country", categorical=True),
    FeatureDef("target_country", "Receiver's country", categorical=True),
    FeatureDef("log_amount", "Amount (log)"),
    FeatureDef("below_threshold", "Amount just below the 10,000 reporting threshold (8,000-9,999.99)"),
    FeatureDef("round_100", "Round amount (multiple of 100)"),
    FeatureDef("round_1000", "Round amount (multiple of 1,000)"),
    FeatureDef("cross_border", "Cross-border transfer"),
    FeatureDef("self_transfer", "Transfer to own account"),
    FeatureDef("hour", "Hour of day"),
    FeatureDef("weekday", "Day of week"),
    *_flow_defs("src", "out", WINDOWS),
    *_flow_defs("src", "in", ("24h", "7d")),
    *_flow_defs("dst", "in", WINDOWS),
    *_flow_defs("dst", "out", ("24h",)),
    FeatureDef("src_days_since_first_out", "Sender: days since its first outgoing transfer"),
    FeatureDef("src_hours_since_last_out", "Sender: hours since its previous outgoing transfer"),
    FeatureDef("src_hours_since_last_in", "Sender: hours since it last received money (dwell time)"),
    FeatureDef("dst_days_since_first_in", "Receiver: days since it first received money"),
    FeatureDef("dst_hours_since_last_in", "Receiver: hours since it last received money"),
    FeatureDef("amount_vs_src_history", "Amount vs sender's average outgoing amount (log)"),
    FeatureDef("src_below_threshold_count_30d", "Sender: transfers just below the threshold in last 30 days"),
    FeatureDef("src_below_threshold_share_30d", "Sender: share of transfers just below the threshold, last 30 days"),
    FeatureDef("src_round_share_30d", "Sender: share of round-amount transfers, last 30 days"),
    FeatureDef("pass_through_24h", "Sender: amount sent in last 24h incl. this one / amount received in last 24h"),
    FeatureDef("pass_through_7d", "Sender: amount sent in last 7 days incl. this one / amount received in last 7 days"),
    FeatureDef("src_fanout", "Sender: distinct receivers so far"),
    FeatureDef("src_fanout_7d", "Sender: new receivers in last 7 days"),
    FeatureDef("src_fanin", "Sender: distinct accounts it received money from"),
    FeatureDef("dst_fanin", "Receiver: distinct senders so far"),
    FeatureDef("dst_fanin_7d", "Receiver: new senders in last 7 days"),
    FeatureDef("dst_fanout", "Receiver: distinct accounts it sent money to"),
    FeatureDef("pair_count", "Earlier transfers from this sender to this receiver"),
    FeatureDef("pair_amount", "Amount sent earlier from this sender to this receiver"),
    FeatureDef("new_counterparty", "First transfer from this sender to this receiver"),
    FeatureDef("pair_days_since_last", "Days since this sender last paid this receiver"),
    FeatureDef("back_count", "Earlier transfers back from receiver to sender (2-cycle)"),
    FeatureDef("back_amount", "Amount sent earlier back from receiver to sender"),
    FeatureDef("back_hours_since_last", "Hours since receiver last paid sender"),
    FeatureDef("cycle3_count", "Closes a 3-cycle: accounts that received from receiver and paid sender"),
    FeatureDef("cycle3_hours_since_last", "Hours since the newest receiver→x→sender path formed"),
    FeatureDef("risk_corridor", "Learned laundering rate of sender→receiver country corridor",
               learned_rate=True),
    FeatureDef("src_out_label_rate", "Sender: laundering rate of its labelled outgoing transfers (smoothed)"),
    FeatureDef("src_out_labelled", "Sender: labelled outgoing transfers"),
    FeatureDef("src_in_label_rate", "Sender: laundering rate of its labelled incoming transfers (smoothed)"),
    FeatureDef("src_in_labelled", "Sender: labelled incoming transfers"),
    FeatureDef("dst_in_label_rate", "Receiver: laundering rate of its labelled incoming transfers (smoothed)"),
    FeatureDef("dst_in_labelled", "Receiver: labelled incoming transfers"),
    FeatureDef("dst_out_label_rate", "Receiver: laundering rate of its labelled outgoing transfers (smoothed)"),
    FeatureDef("dst_out_labelled", "Receiver: labelled outgoing transfers"),
    *(
        FeatureDef(f"{side}_{suffix}", f"{_SIDE[side]}: {text}")
        for side in ("src", "dst")
        for suffix, text in (
            ("cases", "closed cases"),
            ("confirmed_cases", "confirmed laundering cases"),
            ("confirmed_links", "counterparties with a confirmed case"),
            ("confirmed_links_2hop", "counterparties linked to another account with a confirmed case"),
        )
    ),
]


def feature_set(label_delay_days: float = 30.0) -> FeatureSet:
    """The finance (AML) feature set (label delay: days from a transfer until its outcome is known)."""
    return FeatureSet(
        domain="finance", id_col="transaction_id", time_col="timestamp", label_col="is_laundering",
        entity_cols=(SRC, DST),
        prepare_columns=prepare_columns, sources=sources, specs=SPECS, derive=derive, features=FEATURES,
        version="finance-2",  # 2: self-transfers are in no history
        label_delay=pd.Timedelta(days=label_delay_days),
    )

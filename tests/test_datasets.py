"""Loaders: public customs CSVs, AMLSim output, project format, strict errors and derived cases."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.datasets import (
    CustomsData,
    FinanceData,
    derive_cases,
    load_dataset,
    load_datasets,
    save_dataset,
)
from features.schemas import DataValidationError, validate_table

FIXTURES = Path(__file__).parent / "fixtures"
CUSTOMS_CSV = FIXTURES / "customs_public_sample.csv"
AMLSIM_DIR = FIXTURES / "amlsim_sample"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _raw(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def customs() -> CustomsData:
    return load_dataset("customs", CUSTOMS_CSV)


@pytest.fixture(scope="module")
def finance() -> FinanceData:
    return load_dataset("finance", AMLSIM_DIR)


# ------------------------------------------------------------------------------------------ public customs


def test_public_customs_file(customs: CustomsData) -> None:
    raw = _raw(CUSTOMS_CSV)
    decl = customs.declarations
    assert len(decl) == len(raw) == 300
    assert str(decl["date"].dtype) == "datetime64[ns]"
    assert decl["item_price"].dtype == "float64" and str(decl["fraud"].dtype) == "Int8"
    assert decl["hs6"].str.fullmatch(r"\d{6}").all()
    assert int(decl["fraud"].sum()) == (raw["Fraud"] == "1").sum()
    assert decl["seller_id"].isna().sum() == (raw["Seller ID"] == "").sum() > 0
    assert decl["courier_id"].isna().sum() == (raw["Courier ID"] == "").sum()
    assert "revenue" not in decl
    assert set(decl["declaration_id"]) == set(raw["Declaration ID"])
    keys = list(zip(decl["date"], decl["declaration_id"], strict=True))
    assert keys == sorted(keys)


def test_public_customs_directory_and_zero_padding(tmp_path: Path) -> None:
    raw = _raw(CUSTOMS_CSV)
    raw.iloc[:200].to_csv(tmp_path / "df_syn_train_eng.csv", index=False)
    valid = raw.iloc[200:].copy()
    valid.loc[valid.index[0], "HS6 Code"] = "71080"
    valid.to_csv(tmp_path / "df_syn_valid_eng.csv", index=False)
    data = load_dataset("customs", tmp_path)
    assert len(data.declarations) == 300
    row = data.declarations.set_index("declaration_id").loc[valid["Declaration ID"].iloc[0]]
    assert row["hs6"] == "071080"


def test_several_datasets_read_as_one(tmp_path: Path, customs: CustomsData, finance: FinanceData) -> None:
    """A model's training then evaluation file as one history: time order, an id in both once (the last file's
    copy), cases derived from the combined events, a given cases table kept."""
    raw = _raw(CUSTOMS_CSV)
    first = raw.iloc[:200].copy()
    flipped = first.index[180]  # also in the second file, where its label is the true one
    first.loc[flipped, "Fraud"] = "0" if first.loc[flipped, "Fraud"] == "1" else "1"
    first.to_csv(tmp_path / "train.csv", index=False)
    raw.iloc[150:].to_csv(tmp_path / "eval.csv", index=False)
    both = load_datasets("customs", [tmp_path / "eval.csv", tmp_path / "train.csv"][::-1])
    pd.testing.assert_frame_equal(both.declarations, customs.declarations)
    pd.testing.assert_frame_equal(both.cases.sort_values("case_id", ignore_index=True),
                                  customs.cases.sort_values("case_id", ignore_index=True))

    tx = finance.transactions
    cut = tx["timestamp"].iloc[len(tx) // 2]
    early = FinanceData(tx[tx["timestamp"] <= cut], finance.accounts, finance.cases.iloc[:0])
    late = FinanceData(tx[tx["timestamp"] > cut], finance.accounts, finance.cases.iloc[:0])
    save_dataset(early, tmp_path / "early")
    save_dataset(late, tmp_path / "late")
    reviewed = derive_cases("finance", tx).iloc[:1].assign(case_id="reviewer-1", source="reviewer")
    reviewed[["opened_at", "closed_at"]] += pd.Timedelta(days=1)  # a later case of the same account
    reviewed.to_parquet(tmp_path / "early" / "cases.parquet", index=False)
    merged = load_datasets("finance", [tmp_path / "early", tmp_path / "late"])
    assert merged.transactions["transaction_id"].tolist() == tx["transaction_id"].tolist()
    derived = merged.cases[merged.cases["source"] == "derived"].set_index("case_id")
    whole = derive_cases("finance", tx).set_index("case_id")  # an account's case opens at its first transfer
    pd.testing.assert_series_equal(derived["opened_at"].sort_index(), whole["opened_at"].sort_index())
    assert "reviewer-1" in set(merged.cases["case_id"])
    assert merged.accounts["account_id"].is_unique
    with pytest.raises(ValueError, match="no finance dataset"):
        load_datasets("finance", [])


# ------------------------------------------------------------------------------------------ AMLSim


def test_amlsim_loader(finance: FinanceData) -> None:
    nodes, raw = _raw(AMLSIM_DIR / "nodes.csv"), _raw(AMLSIM_DIR / "transactions.csv")
    tx, acc = finance.transactions, finance.accounts
    assert len(tx) == len(raw) and len(acc) == len(nodes)
    assert (tx["currency"] == "USD").all() and (tx["channel"] == "wire").all() and (acc["country"] == "US").all()
    assert tx["transaction_id"].is_unique
    # timestamp = 2020-01-01 + step days, kept per row through the sort
    steps = raw["time"].astype(int).to_numpy()
    by_id = tx.set_index(tx["transaction_id"].astype(int)).sort_index()
    expected = pd.Timestamp("2020-01-01") + pd.to_timedelta(steps, unit="D")
    assert (by_id["timestamp"].to_numpy() == expected.to_numpy()).all()
    assert tx["timestamp"].is_monotonic_increasing
    fraud = set(nodes.loc[nodes["isFraud"] == "1", "nodeid"])
    both = raw["sourceNodeId"].isin(fraud) & raw["targetNodeId"].isin(fraud)
    # laundering = the pattern's transfers: between fraud accounts at the sender's fraudStep (fraud accounts
    # also make ordinary transfers; labelling those would open cases before the fraud happened)
    at_step = raw["time"].astype(int) == raw["sourceNodeId"].map(nodes.set_index("nodeid")["fraudStep"].astype(int))
    expected = both & at_step
    assert (by_id["is_laundering"].to_numpy() == expected.to_numpy().astype(int)).all()
    assert 0 < int(tx["is_laundering"].sum()) == expected.sum() < both.sum()
    assert int(acc["is_fraud"].sum()) == len(fraud)
    assert np.allclose(acc["init_balance"], nodes["init_balance"].astype(float))


def test_amlsim_without_fraud_step_labels_transfers_between_fraud_accounts(tmp_path: Path) -> None:
    nodes, raw = _raw(AMLSIM_DIR / "nodes.csv"), _raw(AMLSIM_DIR / "transactions.csv")
    nodes.drop(columns="fraudStep").to_csv(tmp_path / "nodes.csv", index=False)
    raw.to_csv(tmp_path / "transactions.csv", index=False)
    tx = load_dataset("finance", tmp_path).transactions
    fraud = set(nodes.loc[nodes["isFraud"] == "1", "nodeid"])
    both = raw["sourceNodeId"].isin(fraud) & raw["targetNodeId"].isin(fraud)
    assert int(tx["is_laundering"].sum()) == both.sum()


def test_amlsim_derived_cases(finance: FinanceData) -> None:
    tx, cases = finance.transactions, finance.cases
    bad = tx[tx["is_laundering"] == 1]
    accounts = set(bad["source_account"]) | set(bad["target_account"])
    assert set(cases["entity_id"]) == accounts and cases["entity_id"].is_unique
    assert (cases["outcome"] == "confirmed").all() and (cases["entity_kind"] == "account").all()
    assert (cases["closed_at"] - cases["opened_at"] == pd.Timedelta(days=30)).all()
    first = pd.concat([bad[["source_account", "timestamp"]].set_axis(["a", "t"], axis=1),
                       bad[["target_account", "timestamp"]].set_axis(["a", "t"], axis=1)]).groupby("a")["t"].min()
    assert (cases.set_index("entity_id")["opened_at"].sort_index() == first.sort_index()).all()


def test_amlsim_newer_spelling(tmp_path: Path) -> None:
    pd.DataFrame({"acct_id": ["a1", "a2", "a3"], "dsply_nm": ["x", "y", "z"], "initial_deposit": ["10", "20", "30"],
                  "is_sar": ["True", "False", "True"]}).to_csv(tmp_path / "accounts.csv", index=False)
    pd.DataFrame({
        "tran_id": ["7", "8", "9"], "orig_acct": ["a1", "a2", "a3"], "bene_acct": ["a2", "a3", "a1"],
        "tx_type": ["TRANSFER"] * 3, "base_amt": ["5.5", "6", "7"],
        "tran_timestamp": ["2017-01-02T00:00:00Z", "2017-01-01T00:00:00Z", "2017-01-03T00:00:00Z"],
        "is_sar": ["False", "False", "True"], "alert_id": ["-1", "-1", "4"],
    }).to_csv(tmp_path / "transactions.csv", index=False)
    data = load_dataset("finance", tmp_path)
    tx = data.transactions
    assert list(tx["transaction_id"]) == ["8", "7", "9"]
    assert tx["timestamp"].iloc[0] == pd.Timestamp("2017-01-01")
    assert list(tx["is_laundering"]) == [0, 0, 1]
    assert list(data.accounts["is_fraud"]) == [1, 0, 1]
    assert set(data.cases["entity_id"]) == {"a3", "a1"}


# ------------------------------------------------------------------------------------------ project format


def test_project_round_trip(tmp_path: Path, customs: CustomsData, finance: FinanceData) -> None:
    for name, data in (("customs", customs), ("finance", finance)):
        back = load_dataset(name, save_dataset(data, tmp_path / name))
        assert type(back) is type(data)
        for field in data.__dataclass_fields__:
            pd.testing.assert_frame_equal(getattr(back, field), getattr(data, field), check_like=True)


def test_project_csv_and_chunked_parquet(tmp_path: Path, customs: CustomsData) -> None:
    decl = customs.declarations
    (tmp_path / "csv").mkdir()
    decl.to_csv(tmp_path / "csv" / "declarations.csv", index=False, date_format="%Y-%m-%d")
    back = load_dataset("customs", tmp_path / "csv")
    pd.testing.assert_frame_equal(back.declarations, decl)
    parts = tmp_path / "pq" / "declarations"
    parts.mkdir(parents=True)
    rev = decl.iloc[::-1]
    for i, chunk in enumerate((rev.iloc[:100], rev.iloc[100:200], rev.iloc[200:])):  # out of order on purpose
        chunk.to_parquet(parts / f"part-{i:05d}.parquet", index=False)
    back = load_dataset("customs", tmp_path / "pq")
    pd.testing.assert_frame_equal(back.declarations, decl)


@pytest.fixture
def finance_csv(tmp_path: Path, finance: FinanceData) -> tuple[Path, pd.DataFrame]:
    tx = finance.transactions.head(20).astype(str)
    finance.accounts.to_csv(tmp_path / "accounts.csv", index=False)
    return tmp_path, tx


def _write_and_load(folder: Path, tx: pd.DataFrame) -> str:
    tx.to_csv(folder / "transactions.csv", index=False)
    with pytest.raises(DataValidationError) as err:
        load_dataset("finance", folder)
    return str(err.value)


def test_strict_missing_column(finance_csv) -> None:
    folder, tx = finance_csv
    msg = _write_and_load(folder, tx.drop(columns=["amount"]))
    assert "transactions.csv" in msg and "amount" in msg and "missing" in msg


@pytest.mark.parametrize(("column", "value", "reason"), [
    ("amount", "12,5x", "not a number"),
    ("timestamp", "2020-13-45", "unparsable date"),
    ("amount", "-5", ">= 0"),
    ("source_country", "USA", "2-letter"),
])
def test_strict_bad_value(finance_csv, column: str, value: str, reason: str) -> None:
    folder, tx = finance_csv
    tx.loc[2, column] = value
    msg = _write_and_load(folder, tx)
    assert "transactions.csv" in msg and "row 3" in msg and f"column '{column}'" in msg and reason in msg
    assert "np." not in msg  # values as the user wrote them, not numpy reprs


def test_strict_duplicate_id(finance_csv) -> None:
    folder, tx = finance_csv
    tx.loc[5, "transaction_id"] = tx.loc[1, "transaction_id"]
    msg = _write_and_load(folder, tx)
    assert "transactions.csv" in msg and "row" in msg and "column 'transaction_id'" in msg and "duplicate" in msg


def test_parquet_wrong_type(tmp_path: Path, finance: FinanceData) -> None:
    finance.accounts.to_parquet(tmp_path / "accounts.parquet", index=False)
    finance.transactions.astype({"amount": str}).to_parquet(tmp_path / "transactions.parquet", index=False)
    with pytest.raises(DataValidationError, match=r"transactions\.parquet.*column 'amount'"):
        load_dataset("finance", tmp_path)


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "something.txt").write_text("hello")
    for domain in ("customs", "finance"):
        with pytest.raises(ValueError, match="looked for") as err:
            load_dataset(domain, tmp_path)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown domain"):
        load_dataset("weather", tmp_path)


# ------------------------------------------------------------------------------------------ cases


def test_derived_customs_cases(customs: CustomsData) -> None:
    decl = customs.declarations
    cases = derive_cases("customs", decl, label_delay_days=5)
    validate_table(cases, "cases", "test")
    assert cases["case_id"].is_unique
    assert (cases["closed_at"] >= cases["opened_at"]).all()
    assert (cases["closed_at"] - cases["opened_at"] == pd.Timedelta(days=5)).all()
    n_fraud = int(decl["fraud"].sum())
    for kind, col in (("importer", "importer_id"), ("declarant", "declarant_id"), ("seller", "seller_id")):
        sub = cases[cases["entity_kind"] == kind]
        has = decl[col].notna()
        assert len(sub) == has.sum()
        assert (sub["outcome"] == "confirmed").sum() == int(decl.loc[has, "fraud"].sum())
    assert (cases[cases["entity_kind"] == "importer"]["outcome"] == "confirmed").sum() == n_fraud
    default = customs.cases  # label delay 0: known from the next point in time on
    assert (default["closed_at"] == default["opened_at"]).all() and len(default) == len(cases)


def test_cases_file_merged_with_derived(tmp_path: Path, customs: CustomsData) -> None:
    decl = customs.declarations
    decl.to_parquet(tmp_path / "declarations.parquet", index=False)
    first = decl.iloc[0]
    own = pd.DataFrame({
        "case_id": ["R1", f"importer:{first['declaration_id']}"], "entity_kind": ["importer", "importer"],
        "entity_id": ["SOMEONE", first["importer_id"]],
        "opened_at": ["2019-05-01", str(first["date"].date())], "closed_at": ["2019-06-01", "2020-02-01"],
        "outcome": ["confirmed", "confirmed"], "source": ["reviewer", "reviewer"], "note": ["old", "late verdict"],
    })
    own.to_csv(tmp_path / "cases.csv", index=False)
    cases = load_dataset("customs", tmp_path).cases
    assert len(cases) == len(customs.cases) + 1  # one derived case replaced by the reviewer's
    assert cases["case_id"].is_unique
    mine = cases.set_index("case_id").loc[f"importer:{first['declaration_id']}"]
    assert mine["source"] == "reviewer" and mine["closed_at"] == pd.Timestamp("2020-02-01")


def test_one_external_case_covers_one_derived_case(customs: CustomsData) -> None:
    """An importer with two confirmed and one cleared declaration on one day has three derived cases; an external
    case of that importer and day covers one of them with its outcome, never all three (every case of the day
    matched on entity and opening, so the two confirmed cases vanished from the importer's record)."""
    from features.datasets import derive_cases, merge_cases

    day = customs.declarations.iloc[:3].assign(importer_id="IMP-X", date=pd.Timestamp("2024-01-01"),
                                               fraud=pd.array([1, 1, 0], dtype="Int8"))
    derived = derive_cases("customs", day)
    external = derived[derived["entity_kind"] == "importer"].iloc[[2]].assign(case_id="ext1", source="reviewer")
    assert external["outcome"].iloc[0] == "cleared"
    merged = merge_cases(external, derived)
    importer = merged[merged["entity_kind"] == "importer"]
    assert sorted(importer["outcome"]) == ["cleared", "confirmed", "confirmed"]
    assert "ext1" in set(importer["case_id"]) and len(merged) == len(derived)
    twice = merge_cases(pd.concat([external, external.assign(case_id="ext2", outcome="confirmed")]), derived)
    assert sorted(twice.loc[twice["entity_kind"] == "importer", "case_id"].str[:3]) == ["ext", "ext", "imp"]


def test_unlabelled_data_has_no_cases(tmp_path: Path, customs: CustomsData) -> None:
    customs.declarations.drop(columns=["fraud", "critical_fraud"]).to_parquet(tmp_path / "declarations.parquet")
    data = load_dataset("customs", tmp_path)
    assert len(data.cases) == 0 and list(data.cases.columns)[:6] == [
        "case_id", "entity_kind", "entity_id", "opened_at", "closed_at", "outcome"]


# ------------------------------------------------------------------------------------------ shared data


@pytest.mark.shared
def test_shared_public_files(tmp_path: Path) -> None:
    train = SHARED / "customs-declarations" / "df_syn_train_eng.csv"
    amlsim = SHARED / "amlsim-20k-fanin"
    if not train.exists() or not (amlsim / "nodes.csv").exists():
        pytest.skip("shared data (../shared/data) is not available")
    data = load_dataset("customs", train)
    assert len(data.declarations) == 37_385
    assert data.declarations["declaration_id"].is_unique
    (tmp_path / "only_train").mkdir()
    shutil.copy(train, tmp_path / "only_train" / train.name)
    assert len(load_dataset("customs", tmp_path / "only_train").declarations) == 37_385
    fin = load_dataset("finance", amlsim)
    assert len(fin.transactions) == 118_250 and len(fin.accounts) == 20_000
    assert int(fin.accounts["is_fraud"].sum()) == 954
    assert int(fin.transactions["is_laundering"].sum()) == 1_824  # the 200 fan-in patterns' transfers
    steps = pd.read_csv(amlsim / "nodes.csv", dtype=str).set_index("nodeid")["fraudStep"].astype(int)
    bad = fin.transactions[fin.transactions["is_laundering"] == 1]
    sender_step = pd.Timestamp("2020-01-01") + pd.to_timedelta(bad["source_account"].map(steps), unit="D")
    assert (bad["timestamp"].to_numpy() == sender_step.to_numpy()).all()  # no case opens on an ordinary transfer


def test_header_only_and_unlabelled_csv_load(finance_csv) -> None:
    """A file with no rows, or with an all-empty label column, loads with the contract's types."""
    folder, tx = finance_csv
    tx.head(0).to_csv(folder / "transactions.csv", index=False)
    assert len(load_dataset("finance", folder).transactions) == 0
    tx.assign(is_laundering="").to_csv(folder / "transactions.csv", index=False)
    loaded = load_dataset("finance", folder).transactions
    assert len(loaded) == len(tx) and loaded["is_laundering"].isna().all()


def test_file_problems_name_the_file(tmp_path: Path) -> None:
    """Dates are ISO 8601 (never guessed day/month), offsets are converted or refused when mixed with naive times,
    unreadable files are one error naming the file, a malformed public file is named instead of skipped, and a
    Parquet date32 column loads."""
    raw = _raw(CUSTOMS_CSV)
    folder = tmp_path / "public"
    folder.mkdir()
    cases = {
        "day_first": raw.assign(Date=["13/01/2020", *raw["Date"].iloc[1:]]),
        "mixed_offsets": raw.assign(Date=["2020-01-01T10:00:00+01:00", *raw["Date"].iloc[1:]]),
    }
    for name, frame in cases.items():
        frame.to_csv(folder / "df_syn_x_eng.csv", index=False)
        with pytest.raises(DataValidationError, match="column 'date'") as err:
            load_dataset("customs", folder / "df_syn_x_eng.csv")
        assert "df_syn_x_eng.csv" in str(err.value), name
    (folder / "df_syn_x_eng.csv").unlink()
    raw.iloc[:200].to_csv(folder / "df_syn_train_eng.csv", index=False)
    raw.iloc[200:].rename(columns={"HS6 Code": "HS6"}).to_csv(folder / "df_syn_valid_eng.csv", index=False)
    with pytest.raises(DataValidationError, match=r"df_syn_valid_eng\.csv"):
        load_dataset("customs", folder)
    (folder / "df_syn_valid_eng.csv").write_text("")
    with pytest.raises(DataValidationError, match=r"df_syn_valid_eng\.csv: the file is empty"):
        load_dataset("customs", folder)
    (folder / "df_syn_valid_eng.csv").write_bytes("Declaration ID,Date\n1,2020-01-01 수입\n".encode("cp949"))
    with pytest.raises(DataValidationError, match="not UTF-8"):
        load_dataset("customs", folder)
    events = load_dataset("customs", CUSTOMS_CSV).declarations
    dated = events.assign(date=events["date"].dt.date)  # object column of datetime.date, as Parquet date32 reads
    dated.to_parquet(tmp_path / "dated.parquet")
    assert load_dataset("customs", tmp_path / "dated.parquet").declarations["date"].equals(events["date"])

def test_customs_dates_are_calendar_days_as_the_api_reads_them(tmp_path: Path) -> None:
    """A declaration date is a calendar day: a UTC offset does not move it and a time of day is refused, in files
    (CSV and Parquet) as in the scoring API. Offline, the offset used to shift the day (2023-06-25 at +05:00 was
    scored on the 24th) and times were accepted that the API refuses."""
    from pydantic import TypeAdapter

    from serving.models import Day

    raw = _raw(CUSTOMS_CSV)
    midnight = raw.assign(Date=[f"{d}T00:00:00+05:00" for d in raw["Date"]])
    midnight.to_csv(tmp_path / "df_syn_z_eng.csv", index=False)
    days = load_dataset("customs", tmp_path / "df_syn_z_eng.csv").declarations["date"]
    expected = pd.to_datetime(raw["Date"]).astype("datetime64[ns]")
    assert days.equals(expected.rename("date"))
    api = TypeAdapter(Day)
    assert all(api.validate_python(text) == day.date() for text, day in zip(midnight["Date"], days, strict=True))
    raw.assign(Date=[f"{d}T05:00:00" for d in raw["Date"]]).to_csv(tmp_path / "df_syn_z_eng.csv", index=False)
    with pytest.raises(DataValidationError, match=r"column 'date': '.*T05:00:00' is not a date"):
        load_dataset("customs", tmp_path / "df_syn_z_eng.csv")
    with pytest.raises(ValueError, match="zero time"):
        api.validate_python(f"{raw['Date'].iloc[0]}T05:00:00")
    events = load_dataset("customs", CUSTOMS_CSV).declarations
    aware = events.assign(date=events["date"].dt.tz_localize("Asia/Seoul"))
    aware.to_parquet(tmp_path / "aware.parquet")
    assert load_dataset("customs", tmp_path / "aware.parquet").declarations["date"].equals(events["date"])
    events.assign(date=events["date"] + pd.Timedelta(hours=5)).to_parquet(tmp_path / "timed.parquet")
    with pytest.raises(DataValidationError, match="calendar day cannot have a time of day"):
        load_dataset("customs", tmp_path / "timed.parquet")


def test_a_history_copy_dropped_for_the_scored_file_leaves_no_case(tmp_path: Path, customs: CustomsData) -> None:
    """evaluate / score / drift: an event id in both the history and the scored file counts once, as the file's
    event. The history copy was dropped but its derived cases stayed (a reused id at an earlier time, labelled
    fraud, gave its importer a confirmed case the scored file does not have), and the file's own case was the one
    discarded."""
    from training.pipeline import TrainConfig, load_training_data

    decl = customs.declarations
    history, later = decl.iloc[:150].copy(), decl.iloc[150:].copy()
    reused = later["declaration_id"].iloc[0]
    history.loc[history.index[0], "declaration_id"] = reused  # the same id, earlier, another importer, fraud
    history.loc[history.index[0], ["importer_id", "fraud"]] = ["IMP-OLD", 1]
    later.loc[later.index[0], "fraud"] = 0
    save_dataset(CustomsData(declarations=history, cases=customs.cases.iloc[:0]), tmp_path / "history")
    save_dataset(CustomsData(declarations=later, cases=customs.cases.iloc[:0]), tmp_path / "later")
    config = TrainConfig(eval_path=str(tmp_path / "later"), reviewer_outcomes=False, label_delay_days=0.0)
    data = load_training_data("customs", tmp_path / "history", config, drop_overlap=True)
    assert data.events["declaration_id"].tolist().count(reused) == 1 and data.overlap == 1
    mine = data.cases.set_index("case_id").loc[f"importer:{reused}"]
    assert mine["entity_id"] == later["importer_id"].iloc[0] and mine["outcome"] == "cleared"
    assert "IMP-OLD" not in set(data.cases["entity_id"])

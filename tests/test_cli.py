"""The ``riskscore`` console script as a user runs it: help everywhere, the data -> model -> scores path, and
one-line errors with a non-zero exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from riskscore.cli import COMMANDS, cli

RISKSCORE = Path(sys.executable).with_name("riskscore")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    out = {**os.environ, "RISKSCORE_HOME": str(root / "home"), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "RISKSCORE_ARTIFACT_ROOT": (root / "artifacts").as_uri(), "ROOT": str(root)}
    out.pop("RISKSCORE_AUDIT_URL", None)
    return out


def run(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(RISKSCORE), *args], env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command: str | None) -> None:
    result = CliRunner().invoke(cli, [command, "--help"] if command else ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output


def test_generate_features_train_score_evaluate(env: dict[str, str]) -> None:
    root = Path(env["ROOT"])
    run(env, "generate", "--domain", "customs", "--rows", "3000", "--seed", "3", "--out", str(root / "data"),
        "--positive-rate", "0.08")
    built = run(env, "features", "--domain", "customs", "--in", str(root / "data"), "--out", str(root / "f.parquet"))
    assert "wrote 3,000 rows" in built.stdout
    table = pd.read_parquet(root / "f.parquet")
    assert len(table) == 3000 and {"declaration_id", "date", "fraud"} <= set(table.columns)

    trained = run(env, "train", "--domain", "customs", "--data", str(root / "data"), "--num-threads", "1")
    assert "PR-AUC" in trained.stdout and "v1: promoted" in trained.stdout
    assert "Created version" not in trained.stderr and "registered model" not in trained.stderr.lower()  # not mid-bar

    from features.datasets import load_dataset

    late = load_dataset("customs", root / "data").declarations.tail(200)
    late.to_csv(root / "new.csv", index=False)
    scored = run(env, "score", "--domain", "customs", "--in", str(root / "new.csv"), "--out", str(root / "s.csv"))
    assert "scored 200 items" in scored.stdout
    scores = pd.read_csv(root / "s.csv", dtype={"id": str})
    assert list(scores["id"]) == list(late["declaration_id"])
    assert scores["score"].between(0, 1).all() and scores["reason_1"].notna().all()
    assert {"band", "flagged", "base_value", "reason_1_contribution", "model_version"} <= set(scores.columns)

    evaluated = run(env, "evaluate", "--domain", "customs", "--data", str(root / "data"))
    for metric in ("PR-AUC", "ROC-AUC", " 1%", " 2%", " 5%", "10%", "precision"):
        assert metric in evaluated.stdout, evaluated.stdout

    drift = run(env, "drift", "--domain", "customs", "--data", str(root / "new.csv"))
    assert "psi" in drift.stdout.lower() and "too few items" not in drift.stdout
    as_json = run(env, "drift", "--domain", "customs", "--data", str(root / "new.csv"), "--json", "--min-items", "500")
    report = json.loads(as_json.stdout)  # the progress bar goes to stderr: stdout is the JSON alone
    assert report["items"] == 200 and report["status"] == "insufficient" and not report["retrain_due"]

    as_csv = run(env, "features", "--domain", "customs", "--in", str(root / "new.csv"), "--out", str(root / "f.CSV"))
    assert "features" not in as_csv.stdout.split("wrote")[0]  # the progress bar is on stderr
    assert len(pd.read_csv(root / "f.CSV")) == 200  # CSV by its name (it was Parquet whatever the name)
    (root / "a-file").write_text("")
    for out, message in (("s.json", "must end in .csv or .parquet"), ("a-file/s.csv", "cannot write --out")):
        refused = run(env, "score", "--domain", "customs", "--in", str(root / "new.csv"), "--out", str(root / out),
                      ok=False)
        assert refused.returncode != 0 and message in refused.stderr and "scoring" not in refused.stderr, out
    other = late.assign(date=late["date"] + pd.Timedelta(days=400))  # the ids of history events, other events
    other.to_csv(root / "reused.csv", index=False)
    reused = run(env, "score", "--domain", "customs", "--in", str(root / "reused.csv"), "--out", str(root / "r.csv"))
    assert "gives the ids of 200 history events to events at other times" in reused.stderr
    assert "warning" not in scored.stderr  # the same events as in the history: no warning

    late.iloc[:0].to_csv(root / "empty.csv", index=False)
    empty = run(env, "score", "--domain", "customs", "--in", str(root / "empty.csv"), "--out", str(root / "e.csv"),
                ok=False)
    assert empty.returncode == 1 and "no events in" in empty.stderr and not (root / "e.csv").exists()
    none = run(env, "features", "--domain", "customs", "--in", str(root / "empty.csv"), "--out",
               str(root / "e.parquet"), ok=False)
    assert none.returncode == 1 and "no events in" in none.stderr and not (root / "e.parquet").exists()


def test_errors_are_one_line_with_nonzero_exit(env: dict[str, str]) -> None:
    root = Path(env["ROOT"])
    (root / "bad").mkdir(exist_ok=True)
    (root / "bad" / "transactions.csv").write_text("transaction_id,timestamp\nT1,not-a-date\n")
    (root / "bad" / "accounts.csv").write_text("account_id,country\nA,US\n")
    bad = run(env, "features", "--domain", "finance", "--in", str(root / "bad"), "--out", str(root / "x.parquet"),
              ok=False)
    assert bad.returncode != 0
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("riskscore:") and "transactions.csv" in lines[0], bad.stderr
    unknown = run(env, "train", "--domain", "customs", ok=False)
    assert unknown.returncode != 0 and "--data" in unknown.stderr
    no_model = run({**env, "RISKSCORE_MODEL_FINANCE": "no-such-model"}, "score", "--domain", "finance", "--in",
                   str(root / "bad"), "--out", str(root / "y.csv"), ok=False)
    assert no_model.returncode != 0 and len(no_model.stderr.strip().splitlines()) == 1, no_model.stderr
    verbose = run(env, "-v", "train", "--domain", "finance", "--data", str(root / "bad"), ok=False)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr  # -v: the traceback behind the one line
    for flag, value in (("--num-threads", "0"), ("--search-trials", "-1"), ("--search-seconds", "0")):
        ranged = run(env, "train", "--domain", "finance", "--data", str(root / "bad"), flag, value, ok=False)
        assert ranged.returncode == 2 and flag in ranged.stderr, ranged.stderr
    (root / "c.toml").write_text("capacity = 'abc'\n")
    typed = run(env, "train", "--domain", "finance", "--data", str(root / "bad"), "--config", str(root / "c.toml"),
                ok=False)
    assert "config key capacity must be float" in typed.stderr, typed.stderr
    (root / "c.toml").write_text("capacity = \n")
    broken = run(env, "train", "--domain", "finance", "--data", str(root / "bad"), "--config", str(root / "c.toml"),
                 ok=False)
    assert "c.toml: " in broken.stderr and len(broken.stderr.strip().splitlines()) == 1, broken.stderr
    cases_dir = run(env, "train", "--domain", "finance", "--data", str(root / "bad"), "--cases", str(root / "bad"),
                    ok=False)
    assert cases_dir.returncode == 2 and "is a directory" in cases_dir.stderr, cases_dir.stderr
    stray = run(env, "drift", "--domain", "customs", "--no-history", ok=False)
    assert stray.returncode != 0 and "apply to --data" in stray.stderr and len(stray.stderr.strip().splitlines()) == 1


def test_train_shows_its_metrics_when_tracking_fails(env: dict[str, str]) -> None:
    """A run that trained and evaluated, then could not reach its MLflow server, still shows its metrics (the table
    printed only after tracking), then the one-line error."""
    from serving.local_server import free_port

    root = Path(env["ROOT"])
    data = root / "data-untracked"
    run(env, "generate", "--domain", "customs", "--rows", "2000", "--seed", "4", "--out", str(data))
    nowhere = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",  # nothing listens there
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    failed = run(nowhere, "train", "--domain", "customs", "--data", str(data), "--num-threads", "1", ok=False)
    assert failed.returncode == 1 and "PR-AUC" in failed.stdout and "test window" in failed.stdout, failed.stdout
    lines = [line for line in failed.stderr.splitlines() if line.startswith("riskscore:")]
    assert len(lines) == 1, failed.stderr


def test_bare_groups_print_their_help_and_keys_list_says_how_to_start(env: dict[str, str], tmp_path: Path) -> None:
    for args in ((), ("keys",)):
        proc = run(env, *args)  # was "riskscore: Usage: ..." on stderr with exit 2
        assert proc.stdout.startswith("Usage: riskscore") and not proc.stderr, proc.stderr
    empty = run({**env, "RISKSCORE_HOME": str(tmp_path)}, "keys", "list", ok=False)
    assert empty.returncode == 1 and "riskscore keys add" in empty.stderr and "Errno" not in empty.stderr


def test_serve_without_usable_keys_is_a_one_line_error(env: dict[str, str], tmp_path: Path) -> None:
    """An empty key file (every key revoked) made BentoML restart its worker for ever; serve refuses to start."""
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    from serving.local_server import free_port

    proc = run({**env, "RISKSCORE_KEYS_FILE": str(keys)}, "serve", "--port", str(free_port()), ok=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "riskscore keys add" in lines[0], proc.stderr


def test_a_port_in_use_is_a_one_line_error_before_any_work(env: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args in (("serve", "--port", port), ("demo", "--port", port, "--customs-rows", "2000")):
            proc = run(env, *args, ok=False)
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert proc.returncode != 0 and len(lines) == 1 and "in use" in lines[0], proc.stderr
    assert not (Path(env["RISKSCORE_HOME"]) / "demo").exists()  # the demo stopped before generating data


@pytest.mark.slow
@pytest.mark.server
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The README's main job on small data: both models registered, served, sample scores with reasons."""
    env = {**os.environ, "RISKSCORE_HOME": str(tmp_path / "home")}
    for key in ("MLFLOW_TRACKING_URI", "RISKSCORE_AUDIT_URL", "RISKSCORE_KEYS_FILE", "RISKSCORE_API_KEYS"):
        env.pop(key, None)
    demo = run(env, "demo", "--customs-rows", "2000", "--finance-rows", "3000")
    out = demo.stdout
    for domain in ("customs", "finance"):
        assert f"registered riskscore-{domain} v1" in out
        assert f"[{domain}] DEMO-" in out
    assert out.count("base value") == 4 and "+ contributions = raw margin" in out
    assert (tmp_path / "home" / "mlflow.db").exists() and (tmp_path / "home" / "audit.db").exists()
    import sqlite3

    with sqlite3.connect(tmp_path / "home" / "audit.db") as conn:
        assert conn.execute("select count(*) from scores").fetchone()[0] == 4

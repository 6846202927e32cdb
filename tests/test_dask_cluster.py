"""``riskscore train --engine dask --scheduler tcp://...`` against a cluster started the way a deployment starts one:
``dask scheduler`` and ``dask worker`` as their own processes (on 127.0.0.1 here), the project installed on the
workers, the training command pointed at the scheduler's address. The run must use that cluster (its workers fit
the model: LightGBM's ``_train_part`` tasks are on the scheduler) and land in MLflow like any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("distributed", reason="the dask extra is not installed")
from distributed import Client

DASK = Path(sys.executable).with_name("dask")
RISKSCORE = Path(sys.executable).with_name("riskscore")
pytestmark = pytest.mark.skipif(not DASK.exists(), reason="the dask command line is not installed")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen([str(DASK), *args], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory) -> Iterator[str]:
    """A scheduler and two single-threaded worker processes; yields the scheduler's address."""
    root = tmp_path_factory.mktemp("dask_cluster")
    info = root / "scheduler.json"
    procs = [_start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(info)], root / "scheduler.log")]
    try:
        deadline = time.monotonic() + 60
        while not info.exists():
            assert procs[0].poll() is None, (root / "scheduler.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the dask scheduler did not start"
            time.sleep(0.2)
        address = json.loads(info.read_text())["address"]
        procs.append(_start(["worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
                             "--memory-limit", "3GiB", "--local-directory", str(root / "work"),
                             "--host", "127.0.0.1"], root / "workers.log"))
        with Client(address, timeout=60) as client:
            deadline = time.monotonic() + 120
            while len(client.scheduler_info()["workers"]) < 2:
                assert procs[1].poll() is None, (root / "workers.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the dask workers did not join"
                time.sleep(0.5)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_train_on_a_separately_started_cluster(scheduler: str, tmp_path) -> None:
    env = {**os.environ, "RISKSCORE_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "RISKSCORE_ARTIFACT_ROOT": (tmp_path / "artifacts").as_uri()}

    def riskscore(*args: str) -> str:
        proc = subprocess.run([str(RISKSCORE), *args], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    data = tmp_path / "finance"
    riskscore("generate", "--domain", "finance", "--rows", "20000", "--seed", "5", "--out", str(data),
              "--positive-rate", "0.1")
    riskscore("train", "--domain", "finance", "--data", str(data), "--engine", "dask", "--scheduler", scheduler)

    with Client(scheduler, timeout=60) as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert "train_part" in prefixes, prefixes  # LightGBM's distributed fit ran on this cluster's workers
    assert any("bucket" in p for p in prefixes), prefixes  # and the feature build's key-bucket tasks

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    versions = mlflow.MlflowClient().search_model_versions("name='riskscore-finance'")
    assert len(versions) == 1
    run = mlflow.get_run(versions[0].run_id)
    params = run.data.params
    assert params.get("engine") == "dask" and params.get("chosen.dask_workers") == "2", params
    assert run.data.metrics["test_pr_auc"] > 0.3, run.data.metrics


def test_workers_that_run_the_project_pass_the_check(scheduler: str) -> None:
    from training.dask_train import check_workers

    with Client(scheduler, timeout=60) as client:
        check_workers(client, timeout=30)  # same environment: imports work, versions match


def test_an_address_that_is_not_a_scheduler_fails_within_the_timeout() -> None:
    """An address that accepts connections but never speaks Dask (a dashboard, a wrong port) hung the training
    command for ever; it now fails with one line after the connect timeout."""
    import socket
    import threading

    from training.dask_train import DaskClusterError, connect

    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])  # and never answer
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(DaskClusterError, match="no Dask scheduler answered"):
            connect(f"tcp://127.0.0.1:{server.getsockname()[1]}", timeout=2)
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        server.close()
    assert time.monotonic() - started < 30


def test_scheduler_without_the_dask_engine_is_a_usage_error() -> None:
    from click.testing import CliRunner

    from training.cli import train_cmd
    from training.pipeline import TrainConfig

    result = CliRunner().invoke(train_cmd, ["--domain", "finance", "--data", ".", "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2 and "--scheduler needs --engine dask" in result.output
    with pytest.raises(ValueError, match="only used with engine = dask"):
        TrainConfig(scheduler="tcp://127.0.0.1:9")

"""``riskscore demo``: the whole job end to end on synthetic data.

generate (customs + finance) -> point-in-time features -> train (baseline + LightGBM, calibration, MLflow run)
-> MLflow Model Registry (``champion``) -> BentoML server on a free loopback port -> score a sample shipment and
transfer with demo keys and print each score with its SHAP reasons -> stop (or keep serving with ``--serve``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import click
import pandas as pd

from riskscore import config
from serving import local_server

READY_TIMEOUT_S = 180.0
SCORE_ROUTES = {"customs": ("/score_shipments", "customs"), "finance": ("/score_transactions", "financial")}


def sample_items(domain: str, data_dir: Path, n_normal: int = 1, n_suspicious: int = 1) -> list[dict]:
    """New events to score: copies of late events (one labelled suspicious), dated just after the data.

    The copies get new ids and a time after the last training event, so the service scores them as new arrivals
    against the history it holds (the training data).
    """
    from features.datasets import load_dataset

    data = load_dataset(domain, data_dir)
    if domain == "customs":
        events, time_col, id_col, label = data.declarations, "date", "declaration_id", "fraud"
        after = events[time_col].max() + pd.Timedelta(days=1)
    else:
        events, time_col, id_col, label = data.transactions, "timestamp", "transaction_id", "is_laundering"
        after = events[time_col].max() + pd.Timedelta(minutes=1)
    late = events.tail(max(len(events) // 10, 1))
    picked = pd.concat([late[late[label] == 1].tail(n_suspicious), late[late[label] == 0].tail(n_normal)])
    from serving.models import Declaration, Transfer

    fields = list((Declaration if domain == "customs" else Transfer).model_fields)
    items = []
    for i, (_, row) in enumerate(picked.iterrows()):
        item = {k: row[k] for k in fields if k in row.index and not pd.isna(row[k])}
        item[id_col] = f"DEMO-{domain[:3].upper()}-{i + 1}"
        item[time_col] = after.strftime("%Y-%m-%d") if domain == "customs" else after.isoformat()
        items.append({k: (v.item() if hasattr(v, "item") else v) for k, v in item.items()})
    return items


def demo_keys(home: Path) -> dict[str, str]:
    """Plaintext demo keys by role (agency ``demo``), created once in ``<home>/demo-keys.json`` (mode 0600)."""
    from serving import auth

    auth.demo_keys()  # creates the file if needed
    doc = json.loads((home / "demo-keys.json").read_text())
    return {k["role"]: k["key"] for k in doc["keys"]}


def start_server(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    """The service on 127.0.0.1:port (log in ``log_path``), ready; a one-line error if it does not come up."""
    proc = local_server.launch(env, log_path, port)
    try:
        local_server.wait_ready(f"http://127.0.0.1:{port}", proc, log_path, READY_TIMEOUT_S)
    except local_server.ServerStartError as err:
        local_server.stop(proc)
        raise click.ClickException(f"{str(err).splitlines()[0]}; see {log_path}") from None
    return proc


def show_score(domain: str, body: dict) -> None:
    """Print one domain's response: per item score, band, flag and the top reasons."""
    for item in body["items"]:
        flag = "FLAGGED" if item["flagged"] else "not flagged"
        click.echo(f"\n[{domain}] {item['id']}: score {item['score']:.3f} ({item['band']}, {flag}; threshold "
                   f"{item['threshold']:.3f}), model {item['model']['name']} v{item['model']['version']}, "
                   f"score id {item['score_id']}")
        click.echo(f"  base value {item['base_value']:+.3f} + contributions = raw margin {item['raw_margin']:+.3f}")
        for reason in item["reasons"]:
            value = reason["value"]
            shown = f"{value:.4g}" if isinstance(value, float) else value
            click.echo(f"  {reason['contribution']:+.3f}  {reason['label']} = {shown}")
        if item.get("other_contribution") is not None:
            click.echo(f"  {item['other_contribution']:+.3f}  all other features")


@click.command("demo")
@click.option("--customs-rows", type=click.IntRange(500), default=10_000, show_default=True,
              help="Synthetic declarations to generate.")
@click.option("--finance-rows", type=click.IntRange(1_000), default=20_000, show_default=True,
              help="Synthetic transfers to generate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data and training.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Server port (0: a free one).")
@click.option("--serve", "keep_serving", is_flag=True, help="Keep the server running after the sample scores.")
@click.option("--json", "as_json", is_flag=True, help="Print the full JSON responses.")
def demo_cmd(customs_rows: int, finance_rows: int, seed: int, port: int, keep_serving: bool, as_json: bool) -> None:
    """Generate data, train and register both models, serve them and score a sample with explanations."""
    import httpx

    from features.synthetic import generate
    from training.pipeline import TrainConfig, train

    if port and (problem := local_server.port_in_use("127.0.0.1", port)):  # before minutes of training
        raise click.ClickException(problem)
    home = config.home()
    home.mkdir(parents=True, exist_ok=True)
    rows = {"customs": customs_rows, "finance": finance_rows}
    data: dict[str, Path] = {}
    for step, domain in enumerate(("customs", "finance"), start=1):
        click.secho(f"\n== {step}/4 {domain}: generate {rows[domain]:,} events, build features, train, register",
                    bold=True)
        out = home / "demo" / "data" / domain
        data[domain] = generate(domain, rows[domain], seed=seed, out_dir=out, positive_rate=0.05)
        result = train(domain, data[domain], config=TrainConfig(seed=seed))
        if result.model_version is None:
            raise click.ClickException(f"{domain}: the model was not registered")

    click.secho("\n== 3/4 serve the champions with BentoML", bold=True)
    keys = demo_keys(home)
    port = port or local_server.free_port()
    env = {**os.environ, "RISKSCORE_HOME": str(home), "MLFLOW_TRACKING_URI": config.tracking_uri(),
           "RISKSCORE_DOMAINS": "customs,finance", "PYTHONUNBUFFERED": "1",
           "RISKSCORE_API_KEYS": ",".join(f"{role}:demo:{_sha(key)}" for role, key in keys.items())}
    env.pop("RISKSCORE_KEYS_FILE", None)
    log_path = home / "demo" / "server.log"
    proc = start_server(env, port, log_path)
    url = f"http://127.0.0.1:{port}"
    click.echo(f"server ready at {url} (log: {log_path}); demo keys: {home / 'demo-keys.json'}")
    try:
        click.secho("\n== 4/4 score a sample shipment and transfer", bold=True)
        with httpx.Client(base_url=url, timeout=60) as client:
            for domain in ("customs", "finance"):
                route, role = SCORE_ROUTES[domain]
                payload = {"items": sample_items(domain, data[domain])}
                resp = client.post(route, json=payload, headers={"Authorization": f"Bearer {keys[role]}"})
                if resp.status_code != 200:
                    raise click.ClickException(f"{route} answered {resp.status_code}: {resp.text[:300]}")
                body = resp.json()
                if as_json:
                    click.echo(json.dumps(body, indent=2))
                show_score(domain, body)
        click.echo(f"\nEvery score above is in the audit store ({config.audit_url()}); MLflow runs and the "
                   f"registry are in {config.tracking_uri()}.")
        if keep_serving:
            click.echo(f"serving at {url}; try:\n  curl -s {url}/healthz\nCtrl+C to stop.")
            with contextlib.suppress(KeyboardInterrupt):
                proc.wait()
    finally:
        local_server.stop(proc)


def _sha(key: str) -> str:
    from serving.auth import hash_key

    return hash_key(key)

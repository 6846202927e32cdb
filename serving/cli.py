"""``riskscore serve`` (run the BentoML service) and ``riskscore keys`` (API key hashes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import click

from serving import auth, local_server


@click.command("serve")
@click.option("--port", default=3000, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 = all).")
@click.option("--domains", default=None, help="Comma-separated domains to serve [default: $RISKSCORE_DOMAINS or "
              "customs,finance].")
@click.option("--workers", default=None, type=click.IntRange(1, 64),
              help="Worker processes [default: $RISKSCORE_WORKERS or 1]; each holds its own online state and catches "
                   "up with the others through the audit store before scoring.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Check that every domain has a champion before starting the server.")
def serve_cmd(port: int, host: str, domains: str | None, workers: int | None, check: bool) -> None:
    """Start the scoring service (``bentoml serve serving.service:RiskScore``) until interrupted."""
    env = dict(os.environ)
    if domains:
        env["RISKSCORE_DOMAINS"] = domains
    if workers:
        env["RISKSCORE_WORKERS"] = str(workers)
    if problem := local_server.port_in_use(host, port):
        raise click.ClickException(problem)
    _check_keys()
    if check:
        _preflight(env.get("RISKSCORE_DOMAINS"))
    cmd = [sys.executable, "-m", "bentoml", "serve", local_server.SERVICE, "--host", host, "--port", str(port)]
    click.echo(f"riskscore: serving on http://{host}:{port} (Ctrl+C to stop)", err=True)
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):  # stop the server with us (Ctrl+C, SIGTERM from a supervisor)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code not in (0, -2, -15, 130, 143):
        raise click.ClickException(f"the server stopped with exit code {code}; see the log above")


def _check_keys() -> None:
    """Fail before starting BentoML when the API keys cannot be read (it would restart its worker for ever)."""
    from serving import auth

    try:
        auth.load_keys()
    except (OSError, ValueError) as err:
        raise click.ClickException(f"cannot serve: {err} (create keys with `riskscore keys add`)") from None


def _preflight(domains: str | None) -> None:
    """Fail before starting BentoML when a domain has no champion (the message names the training command)."""
    from serving.scorer import ServingConfigError, load_champion, served_domains

    previous = os.environ.get("RISKSCORE_DOMAINS")
    try:
        if domains:
            os.environ["RISKSCORE_DOMAINS"] = domains
        problems = []
        for domain in served_domains():
            try:
                load_champion(domain)
            except ServingConfigError as err:
                problems.append(str(err))
    except ServingConfigError as err:
        raise click.ClickException(str(err)) from None
    finally:
        if previous is None:
            os.environ.pop("RISKSCORE_DOMAINS", None)
        else:
            os.environ["RISKSCORE_DOMAINS"] = previous
    if problems:
        raise click.ClickException("cannot serve: " + " | ".join(problems))


@click.group("keys")
def keys_cmd() -> None:
    """Create, list and revoke API keys; only SHA-256 hashes are stored (default file: $RISKSCORE_KEYS_FILE or
    <RISKSCORE_HOME>/keys.json)."""


@keys_cmd.command("add")
@click.option("--role", required=True, type=click.Choice(auth.ROLES), help="What the key may do.")
@click.option("--agency", required=True, help="Agency the key belongs to (reviewers only see its scores).")
@click.option("--file", "path", default=None, type=click.Path(dir_okay=False), help="Key file to append to.")
def add_cmd(role: str, agency: str, path: str | None) -> None:
    """Create a key: prints it once (it cannot be recovered) and stores its hash."""
    key, entry, written = auth.add_key(role, agency, path)
    click.echo(f"stored hash of key {entry.id} (role {role}, agency {agency}) in {written}", err=True)
    click.echo(key)


@keys_cmd.command("list")
@click.option("--file", "path", default=None, type=click.Path(dir_okay=False, exists=True), help="Key file.")
def list_cmd(path: str | None) -> None:
    """Key ids (hash prefixes), roles and agencies."""
    source = Path(path) if path else auth.default_key_file()
    if not source.exists():
        raise click.ClickException(f"no keys yet in {source}: create one with `riskscore keys add`")
    for entry in auth.read_key_file(source):
        click.echo(f"{entry.id}\t{entry.role}\t{entry.agency}")


@keys_cmd.command("revoke")
@click.argument("key_id")
@click.option("--file", "path", default=None, type=click.Path(dir_okay=False, exists=True), help="Key file.")
def revoke_cmd(key_id: str, path: str | None) -> None:
    """Remove a key by its id (as listed); the running service drops it on POST /admin/reload."""
    removed = auth.revoke_key(key_id, path)
    if not removed:
        raise click.ClickException(f"no key with id {key_id!r}")
    click.echo(f"revoked {removed} key(s)", err=True)

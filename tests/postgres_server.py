"""A throw-away PostgreSQL server on 127.0.0.1 for tests of the audit store's PostgreSQL option.

Uses the server binaries of Debian's ``postgresql`` package (``initdb``, ``pg_ctl`` on ``PATH`` or under
``/usr/lib/postgresql/<version>/bin``) and the ``psycopg`` driver (``pip install -e '.[postgres]'``). PostgreSQL
refuses to run as root, so as root the server runs as the ``postgres`` user the package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says what is missing."""


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if not found:
        raise Unavailable(f"PostgreSQL server binaries not installed ({name}; apt-get install postgresql)")
    return found


@contextmanager
def running(port: int) -> Iterator[str]:
    """Start a server on 127.0.0.1:``port`` with its data in a new temporary folder (directly under the system's
    temporary folder, which the ``postgres`` user can reach); yields a SQLAlchemy URL; stops it and removes the
    data after."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Unavailable("the psycopg driver is not installed (pip install -e '.[postgres]')") from None
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="riskscore-pg-"))
    data = root / "pgdata"
    data.mkdir()
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable("running as root and there is no 'postgres' user to run the server") from None
        for path in (root, data):
            os.chown(path, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    log = root / "postgres.log"

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    try:
        run(initdb, "-D", str(data), "-A", "trust", "-U", "riskscore", "--no-sync", "-E", "UTF8")
        run(pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-h 127.0.0.1 -p {port} -k {data} -F", "start")
    except subprocess.CalledProcessError as err:
        detail = (err.stderr or b"").decode(errors="replace")[-2000:]
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise Unavailable(f"could not start PostgreSQL: {detail}{tail}") from None
    try:
        yield f"postgresql+psycopg://riskscore@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(root, ignore_errors=True)

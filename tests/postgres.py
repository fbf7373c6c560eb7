"""A throwaway PostgreSQL server for tests: Debian's server binaries, a temporary data folder, 127.0.0.1.

``postgres_server()`` runs ``initdb`` and ``pg_ctl start`` as an unprivileged user (the server
refuses to run as root: under root it uses the ``postgres`` account the Debian package creates),
with password authentication, and removes everything on exit. Install the binaries with
``apt-get install postgresql``; ``.ci/run`` does.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def find_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
    )
    return versions[-1].parent if versions else None


@dataclass(frozen=True)
class Server:
    port: int
    user: str
    password: str

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname="postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as(account: str | None, cmd: list[str]) -> subprocess.CompletedProcess:
    if account is not None:
        cmd = ["runuser", "-u", account, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@contextlib.contextmanager
def postgres_server(bindir: Path) -> Iterator[Server]:
    """Start a private server on 127.0.0.1 (a free port, password auth); stop and delete it after."""
    account = None
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "running as root but there is no 'postgres' account to run the server"
            ) from None
        account = entry.pw_name
    root = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    data, password = root / "data", secrets.token_hex(12)
    (root / "pw").write_text(password + "\n")
    if account is not None:
        for path in (root, root / "pw"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    port = _free_port()
    user = "pipeline"
    started = False
    try:
        init = _run_as(
            account,
            [
                str(bindir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={root / 'pw'}",
                "--auth=scram-sha-256", "--no-sync", "--encoding=UTF8", "--locale=C",
            ],
        )  # fmt: skip
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        start = _run_as(
            account,
            [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start"],
        )
        if start.returncode != 0:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}\n{log}")
        started = True
        yield Server(port, user, password)
    finally:
        if started:
            _run_as(account, [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)

"""A throwaway PostgreSQL server for the tests of shared Optuna studies.

``PostgresServer`` makes a data directory with ``initdb`` in a temporary folder of its own,
starts ``postgres`` on a free loopback port (its socket in that folder), stops it and
removes the folder. PostgreSQL refuses to run as root, so under root the server runs as
``nobody``, which owns the folder (made outside pytest's private ``tmp_path``, which
``nobody`` cannot enter). The binaries must be on the
PATH (``postgres``, ``initdb``, ``pg_ctl``); tests skip where they are not.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

#: The role the server trusts on loopback connections.
USER = "cim"


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> bool:
    return all(shutil.which(tool) for tool in ("postgres", "initdb", "pg_ctl"))


class PostgresServer:
    """A PostgreSQL server in a temporary folder, on a free loopback port."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="tvm-cim-postgres-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self._as = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        if self._as:  # the server's own user must own its folder
            shutil.chown(self.folder, "nobody")
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        log = str(self.folder / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """The URL as users write it (no driver named)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

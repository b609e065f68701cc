"""A throwaway PostgreSQL server for the tests, started from the operating system's PostgreSQL binaries.

It listens only on a Unix socket in its own temporary folder, trusts local connections, and is removed at
the end of the test session. Each test gets a database of its own from :meth:`PostgresServer.new_database`.
The binaries are looked up on PATH and then in Debian's ``/usr/lib/postgresql/<version>/bin``
(package ``postgresql``). PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` user.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

PORT = 5432  # only names the socket file; nothing listens on TCP


def find_binaries() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``; raises with the install hint if there is none."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "pg_ctl").exists():
            return folder
    raise RuntimeError("PostgreSQL's server binaries are needed for the tests: apt-get install postgresql")


class PostgresServer:
    """``start()``, then ``new_database()`` for each test's URL, then ``stop()``."""

    def __init__(self) -> None:
        self.bin = find_binaries()
        self.base = Path(tempfile.mkdtemp(prefix="llava-bot-pg-"))
        self.data = self.base / "data"
        self.socket_dir = self.base / "socket"
        self._names = itertools.count(1)
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            account = pwd.getpwnam("postgres")
            os.chown(self.base, account.pw_uid, account.pw_gid)
        self.socket_dir.mkdir()
        if self._as_user:
            os.chown(self.socket_dir, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as_user, *command], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
        )
        options = f"-k {self.socket_dir} -p {PORT} -c listen_addresses='' -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.base / "log"), "-w", "start"
        )

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of one database on this server."""
        return f"postgresql+asyncpg://postgres@/{database}?host={self.socket_dir}&port={PORT}"

    async def new_database(self) -> str:
        """Create an empty database and return its URL."""
        import asyncpg

        name = f"test_{next(self._names)}"
        connection = await asyncpg.connect(host=str(self.socket_dir), port=PORT, user="postgres", database="postgres")
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        return self.url(name)

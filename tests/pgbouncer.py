"""PgBouncer in transaction pooling mode in front of the machine's PostgreSQL, for a test session run through it.

`KLEIN_TEST_PGBOUNCER=1` makes tests/conftest.py start one and point the API, the workers and the tests' own
engine at it, with `KLEIN_DB_PREPARED_STATEMENTS=false` unless the environment says otherwise (migrations go
direct). Debian's pgbouncer is 1.18: it does not keep prepared statements in transaction mode (1.21 does).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

THROUGH_PGBOUNCER = os.environ.get("KLEIN_TEST_PGBOUNCER") == "1"


class PgBouncer:
    def __init__(self, directory: Path, server_url: str) -> None:
        server = urlsplit(server_url)
        self.directory = directory
        self.server_host = server.hostname or "127.0.0.1"
        self.server_port = server.port or 5432
        self.user = server.username or "postgres"
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PgBouncer:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise RuntimeError("KLEIN_TEST_PGBOUNCER=1 needs pgbouncer (apt-get install pgbouncer)")
        ini, users = self.directory / "pgbouncer.ini", self.directory / "userlist.txt"
        users.write_text(f'"{self.user}" ""\n')
        ini.write_text(
            "[databases]\n"
            f"* = host={self.server_host} port={self.server_port}\n"  # any database name, forwarded as is
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {users}\n"
            "pool_mode = transaction\nmax_client_conn = 1000\ndefault_pool_size = 20\n"
            # 1.18 refuses startup parameters it does not track. `options` carries the workers' lease engine's
            # `synchronous_commit=off` (core/db.py), which transaction pooling cannot keep: dropped, so claims
            # commit durably through it.
            "ignore_startup_parameters = options\n"
        )
        # It refuses to run as root; it reads its files before it switches user.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.log = self.directory / "pgbouncer.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen([binary, *user, str(ini)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not listen: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: immediate shutdown
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

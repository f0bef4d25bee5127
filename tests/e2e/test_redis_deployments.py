"""The Redis deployments the platform supports (core/redis_connection.py), each against real servers started
here: TLS with a custom CA and client certificates, an ACL user allowed only the platform's commands, and
Sentinel with a failover of the primary while predictions are submitted. Also what a restarted or a stalled
server does to the API's client.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import orjson
import pytest
import redis
from sqlalchemy import select

from api.errors import Unavailable
from api.services.principals import Principal
from api.services.rate_limit import Limiter
from core import quota, redis_connection, tenants
from core.db import make_sync_engine
from core.queue import PREDICT_TASK, enqueue, make_celery, queued_key
from core.redis_connection import aclose_async_client, async_client, sync_client
from core.settings import Settings
from core.tables import predictions
from ops.embedded import SeaweedS3, Service, free_port, start_api, start_worker, wait_until
from ops.migrate import migrate
from tests.stack import create_database, drop_database

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server (with TLS and Sentinel built in)")

# What the platform sends, and nothing else: the API (limits' scripts, idempotency, enqueue, cancel, key changes,
# admin throttle, readiness, the waiter's subscription), the workers and their sweeper, and Celery over kombu's
# Redis transport (queues, unacked messages and their restore, fanout, its scripts and locks). Scripts' own
# commands are checked against the user too. Redis 7.2 and later also need `+client|setinfo` (redis-py names
# itself on connect; older servers have no such command).
ACL_COMMANDS = (
    "+hello +ping +select"
    " +get +set +del +incr +incrby +decr +exists +pexpire +pttl +time +mget"
    " +lpush +rpush +rpop +brpop +llen +lrange +ltrim +expire"
    " +sadd +srem +smembers +smismember"
    " +hget +hmget +hexists +hset +hdel +hgetall +hlen"
    " +zadd +zrem +zrange +zrangebyscore +zcount +zremrangebyscore"
    " +xadd +xrange"
    " +publish +subscribe +unsubscribe +psubscribe +punsubscribe"
    " +eval +evalsha +script|load +script|exists +multi +exec +discard +watch +unwatch"
)


def server_version() -> tuple[int, int]:
    found = re.search(
        r"v=(\d+)\.(\d+)", subprocess.run([str(REDIS_SERVER), "--version"], capture_output=True, text=True).stdout
    )
    assert found, "redis-server --version says no version"
    return int(found[1]), int(found[2])


@dataclass
class Server:
    """A redis-server (or Sentinel) process of this test, configured by `lines`, in its own folder."""

    root: Path
    lines: list[str]
    port: int = field(default_factory=free_port)
    sentinel: bool = False
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / ("sentinel.conf" if self.sentinel else "redis.conf")
        if not config.exists():  # a Sentinel rewrites its own; a restart keeps it
            listen = [] if any(line.startswith("tls-port") for line in self.lines) else [f"port {self.port}"]
            base = ["bind 127.0.0.1", f"dir {self.root}", "daemonize no", *listen]
            if not self.sentinel:
                base += ['save ""', "appendonly no"]
            config.write_text("\n".join([*base, *self.lines]) + "\n")
        args = [str(REDIS_SERVER), str(config), *(["--sentinel"] if self.sentinel else [])]
        with open(self.root / "log", "ab") as log:
            self.process = subprocess.Popen(args, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._listening, 10, f"redis-server on {self.port}", self.root / "log")
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited\n{(self.root / 'log').read_text()[-2000:]}")
        with closing(socket.socket()) as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, **options)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Every server a test starts is stopped after it."""
    started: list[Server] = []
    yield started
    for server in reversed(started):
        server.stop()


def make_certificates(root: Path) -> dict[str, Path]:
    """A CA, and a server and a client certificate it signed (for 127.0.0.1 and localhost), by the openssl CLI."""
    root.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-days", "2", "-subj", "/CN=klein test CA", "-keyout", "ca.key", "-out", "ca.crt")
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        openssl("req", *key, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (root / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
        openssl(
            *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"),
            *("-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt"),
        )
    return {name: root / name for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def admit_and_release(settings: Settings) -> None:
    """The API's limiter over the settings' client: an admission with its slot, then the slot given back."""

    async def scenario() -> None:
        client = async_client(settings)
        try:
            limiter = Limiter(client, settings.queue_name)
            decision, slot = await limiter.hit_and_take_slot(Principal("t", "k", 100, 100, 5))
            assert decision.allowed and slot.granted and slot.held == 0
            await slot.give_back()
            assert await client.get(quota.in_flight_key(settings.queue_name, "t")) == b"0"
        finally:
            await aclose_async_client(client)

    asyncio.run(scenario())


def test_tls_with_a_custom_ca_and_client_certificates(tmp_path: Path, servers: list[Server]) -> None:
    certificates = make_certificates(tmp_path / "tls")
    port = free_port()
    tls = [
        "port 0",
        f"tls-port {port}",
        f"tls-cert-file {certificates['server.crt']}",
        f"tls-key-file {certificates['server.key']}",
        f"tls-ca-cert-file {certificates['ca.crt']}",
        "tls-auth-clients yes",
    ]
    servers.append(Server(tmp_path / "redis", tls, port=port).start())
    settings = Settings(
        redis_url=f"rediss://127.0.0.1:{port}/2",
        redis_ca_file=str(certificates["ca.crt"]),
        redis_cert_file=str(certificates["client.crt"]),
        redis_key_file=str(certificates["client.key"]),
        queue_name=f"tls-{secrets.token_hex(3)}",
    )

    admit_and_release(settings)  # the API's client
    worker_side = sync_client(settings)
    enqueue(worker_side, settings, "pred-tls", "flux-klein-4b")  # the workers' and the sweeper's
    assert worker_side.sismember(queued_key(settings), "pred-tls")
    worker_side.delete(settings.queue_name, queued_key(settings))

    app = make_celery(settings)  # Celery's broker, over kombu: a task sent, and read back by a consumer
    app.send_task(PREDICT_TASK, args=["pred-celery"], queue=settings.queue_name)
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(settings.queue_name, no_ack=True)
        message = queue.get(timeout=5)
        assert message.headers["task"] == PREDICT_TASK and message.payload[0] == ["pred-celery"]
        queue.close()

    # The server's certificate is verified: without our CA (only the system's), nothing connects.
    unverified = settings.model_copy(update={"redis_ca_file": None})
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        sync_client(unverified).ping()
    with (
        pytest.raises(Exception, match="certificate verify failed"),
        make_celery(unverified).connection_for_read() as connection,
    ):
        connection.ensure_connection(max_retries=1)
    # And the server asks for ours: without a client certificate, the handshake fails.
    anonymous = settings.model_copy(update={"redis_cert_file": None, "redis_key_file": None})
    with pytest.raises(redis.ConnectionError):
        sync_client(anonymous).ping()
    with pytest.raises(ValueError, match="rediss://"):  # TLS files with a plain URL: a mistake, said so
        sync_client(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/2"}))


def test_a_restart_fails_the_commands_in_flight_and_the_next_ones_reconnect(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Nothing is retried (a retried admission could count twice): a command in flight when Redis restarts fails.
    The pool replaces the connections the server closed as they are checked out, and the limiter's scripts load
    themselves on the fresh server."""
    server = Server(tmp_path / "redis", [])
    servers.append(server.start())
    settings = Settings(redis_url=f"redis://127.0.0.1:{server.port}/0", queue_name="restart")

    async def scenario() -> None:
        client = async_client(settings)
        limiter = Limiter(client, settings.queue_name)
        principal = Principal("t", "k", 100, 100, 5)
        try:
            decisions = await asyncio.gather(*(limiter.hit(principal) for _ in range(8)))  # 8 pooled connections
            assert all(d.allowed for d in decisions)
            in_flight = asyncio.create_task(client.execute_command("WAIT", 1, 2000))  # no replica: waits 2 s
            await asyncio.sleep(0.2)
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            with pytest.raises(redis.ConnectionError):
                await in_flight
            decisions = await asyncio.gather(*(limiter.hit(principal) for _ in range(8)))  # on fresh connections
            assert all(d.allowed for d in decisions)  # EVALSHA on a server without the script: loaded, then run
            assert await client.ping()
            assert (await limiter.take_slot("t", 5)).granted
        finally:
            await aclose_async_client(client)

    asyncio.run(scenario())


def test_a_stalled_server_times_out_and_the_limiter_answers_503(
    tmp_path: Path, servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_connection, "TIMEOUT_S", 0.5)
    server = Server(tmp_path / "redis", [])
    servers.append(server.start())
    settings = Settings(redis_url=f"redis://127.0.0.1:{server.port}/0", queue_name="stall")
    assert server.process is not None

    async def scenario() -> None:
        client = async_client(settings)
        limiter = Limiter(client, settings.queue_name)
        try:
            await client.ping()
            server.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            started = time.monotonic()
            try:
                with pytest.raises(Unavailable):
                    await limiter.hit(Principal("t", "k", 100, 100, 5))
                with pytest.raises(redis.TimeoutError):
                    await client.ping()  # a new connection too: its handshake times out
                assert time.monotonic() - started < 3
            finally:
                server.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            assert await client.ping()
        finally:
            await aclose_async_client(client)

    asyncio.run(scenario())


# End to end: the real API, and the real worker with its pipeline stubbed (bench/stub_worker.py: a 64×64 image at
# once, everything else as in production), on a database and an S3 server of this module.


@pytest.fixture(scope="module")
def platform_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    database = f"klein_redis_{secrets.token_hex(4)}"
    database_url = create_database(database)
    s3 = SeaweedS3(tmp_path_factory.mktemp("s3")).start()
    env = os.environ | {
        "KLEIN_DATABASE_URL": database_url,
        "KLEIN_S3_ENDPOINT_URL": s3.endpoint_url,
        "KLEIN_S3_BUCKET": "redis-deployments",
        "KLEIN_S3_ACCESS_KEY_ID": s3.access_key,
        "KLEIN_S3_SECRET_ACCESS_KEY": s3.secret_key,
        "KLEIN_DEVICE": "cpu",
        "KLEIN_DEFAULT_RATE_LIMIT_PER_MINUTE": "100000",
        "KLEIN_ADMIN_API_KEY": "admin-" + secrets.token_hex(8),
        "KLEIN_URL_SIGNING_KEY": secrets.token_hex(16),
        "KLEIN_TRY_SYNC_TIMEOUT_S": "20",
        "KLEIN_WORKER_METRICS_PORT": "0",  # a taken metrics port stops a worker: none here to collide on
        "KLEIN_WEBHOOK_METRICS_PORT": "0",
        # A lost queue message (writes to a primary that was then demoted) is put back within seconds.
        "KLEIN_LEASE_S": "2",
        "KLEIN_SWEEP_INTERVAL_S": "0.5",
        "KLEIN_REQUEUE_GRACE_S": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    migrate(Settings(database_url=database_url).sync_database_url)
    try:
        yield env
    finally:
        s3.stop()
        drop_database(database)


@dataclass
class Platform:
    api_url: str
    key: str
    settings: Settings
    services: list[Service]

    def submit(self, prompt: str, timeout: float = 30, **headers: str) -> httpx.Response:
        body = {"input": {"prompt": prompt, "num_inference_steps": 1, "output_format": "png"}}
        headers = {"apikey": self.key, "Model": "flux-klein-4b", **headers}
        return httpx.post(f"{self.api_url}/v1/predictions", headers=headers, json=body, timeout=timeout)

    def statuses(self, ids: list[str]) -> dict[str, str]:
        engine = make_sync_engine(self.settings)
        try:
            with engine.connect() as conn:
                rows = conn.execute(select(predictions.c.id, predictions.c.status).where(predictions.c.id.in_(ids)))
                return {row.id: row.status for row in rows}
        finally:
            engine.dispose()


@pytest.fixture
def start_platform(platform_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Starts a worker and the API with the given Redis settings, and a tenant with one key."""
    services: list[Service] = []

    def start(redis_env: dict[str, str]) -> Platform:
        env = platform_env | {"KLEIN_QUEUE_NAME": f"q-{secrets.token_hex(3)}"} | redis_env
        with mock.patch.dict(os.environ, env):  # read as the API and the worker read it
            settings = Settings()
        services.append(start_worker(env, tmp_path / "worker.log", "stub", app="bench.stub_worker"))
        api, api_url = start_api(env, tmp_path / "api.log")
        services.append(api)
        tenant_id, create = tenants.create_tenant(f"redis-{secrets.token_hex(4)}")
        issued, issue = tenants.issue_key(tenant_id)
        engine = make_sync_engine(settings)
        with engine.begin() as conn:
            conn.execute(create)
            conn.execute(issue)
        engine.dispose()
        return Platform(api_url, issued.key, settings, services)

    yield start
    for service in reversed(services):
        service.stop(timeout=10)


def wait_finished(platform: Platform, ids: list[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        statuses = platform.statuses(ids)
        if all(statuses.get(i) in ("completed", "failed", "canceled") for i in ids) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.2)


def test_an_acl_user_allowed_only_the_platforms_commands(
    tmp_path: Path, servers: list[Server], start_platform: Any
) -> None:
    password, inspector = secrets.token_hex(8), secrets.token_hex(8)
    acl = [
        "user default off",
        f"user klein on >{password} ~* &* -@all {ACL_COMMANDS}",
        f"user inspector on >{inspector} ~* &* +@all",
    ]
    if server_version() >= (7, 2):  # a server that knows CLIENT SETINFO checks it against the user
        acl[1] += " +client|setinfo"
    server = Server(tmp_path / "redis", acl)
    servers.append(server.start())
    with pytest.raises(redis.AuthenticationError):  # the default user is off: nobody gets in without the ACL user
        server.client().ping()
    admin = server.client(username="inspector", password=inspector)
    platform = start_platform(
        {
            "KLEIN_REDIS_URL": f"redis://127.0.0.1:{server.port}/3",
            "KLEIN_REDIS_USERNAME": "klein",
            "KLEIN_REDIS_PASSWORD": password,
        }
    )
    api, key = platform.api_url, {"apikey": platform.key}

    first = platform.submit("acl", **{"Idempotency-Key": "acl-1"})  # limiter, idempotency, enqueue
    assert first.status_code == 201, first.text
    assert platform.submit("acl", **{"Idempotency-Key": "acl-1"}).json()["id"] == first.json()["id"]
    synced = platform.submit("acl sync", **{"Try-Sync": "true"})  # the worker's event wakes the waiter
    assert synced.status_code == 200 and synced.json()["status"] == "succeeded", synced.text
    queued = [first.json()["id"], *(platform.submit(f"acl {i}").json()["id"] for i in range(2))]
    created = httpx.post(f"{api}/v1/keys", headers=key, json={"name": "extra"}).json()
    assert httpx.delete(f"{api}/v1/keys/{created['id']}", headers=key).status_code == 200  # keys changed: PUBLISH
    assert httpx.get(f"{api}/admin/v1/tenants", headers={"X-Admin-Key": "wrong"}).status_code == 401
    assert httpx.get(f"{api}/readyz").status_code == 200
    statuses = wait_finished(platform, queued, 30)
    assert [statuses[i] for i in queued] == ["completed"] * 3, statuses
    time.sleep(1.5)  # a few of the sweeper's passes
    platform.services[0].stop()  # the worker (Celery's shutdown included): what is submitted now stays queued
    waiting = platform.submit("acl cancel").json()["id"]
    queued_view = httpx.get(f"{api}/v1/predictions/status/{waiting}", headers=key).json()  # the fleet's pace
    assert queued_view["queue_position"] >= 0 and "eta_s" in queued_view
    with httpx.stream("GET", f"{api}/v1/predictions/{queued[0]}/stream", headers=key) as events:  # XRANGE
        assert b"event: done" in events.read()
    canceled = httpx.post(f"{api}/v1/predictions/{waiting}/cancel", headers=key)  # SREM and PUBLISH
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled", canceled.text

    denied = admin.acl_log()
    assert denied == [], denied  # not one command of the API, the worker, its sweeper or Celery was refused
    used = sorted(name.removeprefix("cmdstat_") for name in admin.info("commandstats"))
    print("commands used:", " ".join(used))


def test_sentinel_failover_during_submits_loses_nothing(
    tmp_path: Path, servers: list[Server], start_platform: Any
) -> None:
    """One primary, one replica, two Sentinels (quorum 1). `SENTINEL FAILOVER` while a client submits a
    prediction every 0.25 s: answers are 201, or 503 during the switch; submits succeed again within seconds of
    it, and every accepted prediction completes (writes the demoted primary took are lost with it, and the
    sweeper puts their predictions back in the queue)."""
    primary = Server(tmp_path / "primary", [])
    servers.append(primary.start())
    replica = Server(tmp_path / "replica", [f"replicaof 127.0.0.1 {primary.port}"])
    servers.append(replica.start())
    monitor = [
        f"sentinel monitor mymaster 127.0.0.1 {primary.port} 1",
        "sentinel down-after-milliseconds mymaster 2000",
        "sentinel failover-timeout mymaster 10000",
    ]
    sentinels = [Server(tmp_path / f"sentinel-{i}", monitor, sentinel=True) for i in range(2)]
    for sentinel in sentinels:
        servers.append(sentinel.start())
    watcher = sentinels[0].client(decode_responses=True)

    def replica_known() -> bool:
        found = watcher.sentinel_slaves("mymaster")
        return any(r["port"] == replica.port and r["master-link-status"] == "ok" for r in found)

    wait_until(replica_known, 20, "the Sentinels' view of the replica")
    platform = start_platform(
        {
            "KLEIN_REDIS_URL": "redis://mymaster/0",
            "KLEIN_REDIS_SENTINELS": orjson.dumps([f"127.0.0.1:{s.port}" for s in sentinels]).decode(),
            "KLEIN_REDIS_SENTINEL_SERVICE": "mymaster",
        }
    )
    answers: list[tuple[float, int, str | None]] = []  # (when, status, prediction id)
    stop = threading.Event()

    def submit_forever() -> None:
        i = 0
        while not stop.is_set():
            try:
                answer = platform.submit(f"sentinel {i}", timeout=15)
                accepted = answer.json()["id"] if answer.status_code == 201 else None
                answers.append((time.monotonic(), answer.status_code, accepted))
            except httpx.HTTPError as exc:
                answers.append((time.monotonic(), 0, repr(exc)))
            i += 1
            stop.wait(0.25)

    submitter = threading.Thread(target=submit_forever)
    submitter.start()
    try:
        time.sleep(3)
        failover_at = time.monotonic()
        assert watcher.execute_command("SENTINEL FAILOVER", "mymaster")
        wait_until(
            lambda: watcher.sentinel_get_master_addr_by_name("mymaster") == ("127.0.0.1", replica.port),
            20,
            "the failover",
        )
        switched_at = time.monotonic()
        # Until a Sentinel reconfigures the old primary (about 10 s after the switch), it still takes the writes of
        # the connections open to it; then it drops them and the clients find the new primary.
        wait_until(lambda: primary.client().info("replication")["role"] == "slave", 30, "the old primary's demotion")
        demoted_at = time.monotonic()
        time.sleep(4)
    finally:
        stop.set()
        submitter.join(30)

    statuses = {status for _, status, _ in answers}
    assert statuses <= {201, 503}, answers
    before = [a for a in answers if a[0] < failover_at]
    after = [a for a in answers if a[0] > demoted_at + 1]
    assert before and all(status == 201 for _, status, _ in before), before
    assert len(after) >= 3 and all(status == 201 for _, status, _ in after), after  # submits recovered
    accepted = [pid for _, status, pid in answers if status == 201 and pid]
    statuses_by_id = wait_finished(platform, accepted, 60)
    unfinished = {pid: status for pid, status in statuses_by_id.items() if status != "completed"}
    assert len(statuses_by_id) == len(accepted) and not unfinished, unfinished
    print(
        f"{len(accepted)} accepted, {sum(s == 503 for _, s, _ in answers)} answered 503; the Sentinels named the new"
        f" primary {switched_at - failover_at:.1f} s and demoted the old one {demoted_at - failover_at:.1f} s after"
        " the failover began"
    )

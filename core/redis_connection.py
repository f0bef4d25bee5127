"""Every Redis client of the platform, built from Settings: the API's (redis.asyncio), the workers' and the
sweeper's (redis-py), and Celery's broker connection (kombu's Redis transport, on redis-py too).

Where: `redis_url` (redis:// or rediss:// for TLS, with the database and optionally credentials); or, with
`redis_sentinels` set, the server the Sentinels name primary of `redis_sentinel_service` (the URL then gives
the scheme, credentials and database; its host is not used). TLS verifies the server against `redis_ca_file`
(else the system's CAs) and its host name, and presents `redis_cert_file`/`redis_key_file` when set; Sentinels
are reached with the same TLS settings. `redis_username`/`redis_password` take precedence over the URL's.

Every command waits at most TIMEOUT_S for its reply, so a stalled Redis is a TimeoutError (the API's 503), and
nothing is retried by the client: a retried INCR, LPUSH or script could count or queue twice. A pooled
connection the server closed (a restart, a Sentinel's reconfiguration of a demoted primary) is replaced when it
is next checked out, so such an event costs the commands in flight on it and no more. Redis Cluster is not
supported (docs/scaling.md, "Redis deployments").
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import quote, urlsplit

import redis
import redis.asyncio
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from core.settings import Settings

TIMEOUT_S = 5.0  # to connect, and for each reply
API_MAX_CONNECTIONS = 64  # per API process; a command waits up to TIMEOUT_S for one of them to be free
SENTINEL_PORT = 26379


def uses_tls(settings: Settings) -> bool:
    return urlsplit(settings.redis_url).scheme == "rediss"


def tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS keywords (also kombu's `broker_use_ssl`): the server's certificate and name verified."""
    files = {"ssl_ca_certs": settings.redis_ca_file, "ssl_certfile": settings.redis_cert_file}
    files["ssl_keyfile"] = settings.redis_key_file
    if not uses_tls(settings):
        if any(files.values()):
            raise ValueError("KLEIN_REDIS_CA_FILE, _CERT_FILE and _KEY_FILE need a rediss:// KLEIN_REDIS_URL")
        return {}
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True, **files}


def _url_options(settings: Settings) -> dict[str, Any]:
    """The URL as redis-py reads it (host, port, db, credentials, query options), with the settings' credentials."""
    if urlsplit(settings.redis_url).scheme not in ("redis", "rediss"):
        raise ValueError(f"KLEIN_REDIS_URL must be redis:// or rediss://, not {settings.redis_url.split(':')[0]}://")
    options = parse_url(settings.redis_url)
    options.pop("connection_class", None)  # chosen below: sync or async, TLS or not, Sentinel-managed or not
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password and settings.redis_password.get_secret_value():
        options["password"] = settings.redis_password.get_secret_value()
    return options


def _common(asynchronous: bool) -> dict[str, Any]:
    """Timeouts, no retries, and RESP2: with redis-py's default RESP3 come its maintenance notifications, which turn
    off the pool's check of a connection at checkout (a connection the server closed would fail its next command)."""
    retry = AsyncRetry(NoBackoff(), 0) if asynchronous else Retry(NoBackoff(), 0)
    return {"socket_timeout": TIMEOUT_S, "socket_connect_timeout": TIMEOUT_S, "retry": retry, "protocol": 2}


def _options(settings: Settings, asynchronous: bool) -> dict[str, Any]:
    """Connection keywords of the data nodes: the URL's, timeouts, no retries, TLS."""
    return {**_common(asynchronous), **_url_options(settings), **tls_options(settings)}


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    addresses = []
    for entry in settings.redis_sentinels:
        host, colon, port = entry.strip().rpartition(":")
        if not colon or not port.isdigit():  # no port given (or a bare IPv6 address)
            host, port = entry.strip(), str(SENTINEL_PORT)
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def _sentinel_options(settings: Settings, asynchronous: bool) -> dict[str, Any]:
    """Keywords of the connections to the Sentinels themselves: timeouts, TLS as the data nodes, own credentials."""
    options = _common(asynchronous)
    if uses_tls(settings):
        options |= {"ssl": True, **tls_options(settings)}
    if settings.redis_sentinel_username:
        options["username"] = settings.redis_sentinel_username
    if settings.redis_sentinel_password and settings.redis_sentinel_password.get_secret_value():
        options["password"] = settings.redis_sentinel_password.get_secret_value()
    return options


class _BlockingSentinelPool(AsyncSentinelConnectionPool, BlockingConnectionPool):
    """The primary found through Sentinel, with BlockingConnectionPool's bound on connections."""


def async_client(settings: Settings) -> redis.asyncio.Redis:
    """The API's client: a bounded pool of connections to the primary. Close it with `aclose_async_client`."""
    options = _options(settings, asynchronous=True)
    bound: dict[str, Any] = {"max_connections": API_MAX_CONNECTIONS, "timeout": TIMEOUT_S}
    if settings.redis_sentinels:
        for key in ("host", "port"):
            options.pop(key, None)
        tls: dict[str, Any] = {"ssl": True} if uses_tls(settings) else {}
        sentinel = AsyncSentinel(
            sentinel_addresses(settings), sentinel_kwargs=_sentinel_options(settings, asynchronous=True), **options
        )
        return sentinel.master_for(
            settings.redis_sentinel_service, connection_pool_class=_BlockingSentinelPool, **bound, **tls
        )
    connection_class = redis.asyncio.SSLConnection if uses_tls(settings) else redis.asyncio.Connection
    return redis.asyncio.Redis.from_pool(BlockingConnectionPool(connection_class=connection_class, **bound, **options))


async def aclose_async_client(client: redis.asyncio.Redis) -> None:
    """Close the client's connections, and its Sentinel's if it has one."""
    await client.aclose()
    sentinel = getattr(client.connection_pool, "sentinel_manager", None)
    if sentinel is not None:
        await sentinel.aclose()


def sync_client(settings: Settings) -> redis.Redis:
    """The workers' and the sweeper's client (thread-safe: a pool of connections to the primary)."""
    options = _options(settings, asynchronous=False)
    if settings.redis_sentinels:
        for key in ("host", "port"):
            options.pop(key, None)
        tls: dict[str, Any] = {"ssl": True} if uses_tls(settings) else {}
        sentinel = Sentinel(
            sentinel_addresses(settings), sentinel_kwargs=_sentinel_options(settings, asynchronous=False), **options
        )
        return sentinel.master_for(settings.redis_sentinel_service, **tls)
    connection_class = redis.SSLConnection if uses_tls(settings) else redis.Connection
    return redis.Redis.from_pool(redis.ConnectionPool(connection_class=connection_class, **options))


def broker(settings: Settings) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """Celery's broker: its URL, the transport options it needs (Sentinel's), and `broker_use_ssl`.

    kombu reads credentials and the database from the URL (so the settings' are written into it), TLS from
    `broker_use_ssl` (without it, a rediss:// URL would skip verifying the server), and Sentinel from
    `sentinel://host:port;sentinel://…` URLs with the `master_name` and `sentinel_kwargs` transport options."""
    options = _url_options(settings)
    userinfo = ""
    if options.get("username") or options.get("password"):
        userinfo = f"{quote(options.get('username') or '', safe='')}:{quote(options.get('password') or '', safe='')}@"
    db = options.get("db", 0)
    use_ssl = tls_options(settings) or None
    if settings.redis_sentinels:
        nodes = [f"sentinel://{userinfo}{_netloc(host, port)}/{db}" for host, port in sentinel_addresses(settings)]
        sentinel_kwargs = _sentinel_options(settings, asynchronous=False)
        del sentinel_kwargs["retry"]  # kombu retries (and reconnects) on its own
        transport_options = {"master_name": settings.redis_sentinel_service, "sentinel_kwargs": sentinel_kwargs}
        return ";".join(nodes), transport_options, use_ssl
    scheme = "rediss" if uses_tls(settings) else "redis"
    netloc = _netloc(options.get("host", "localhost"), options.get("port", 6379))
    return f"{scheme}://{userinfo}{netloc}/{db}", {}, use_ssl


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""The API's Redis commands, multiplexed over one pipelined connection.

redis-py checks a connection out of its pool for every command and arms a timer around each write
and read: about 45 µs of the event loop's CPU per command, as much as the rest of a status read
(docs/performance.md). Here every request shares one connection: a command is queued for writing and
its reply matched to it by order, since Redis answers in order. What the requests of one event-loop
pass send goes out in one write, so concurrent requests are pipelined for free (about 7 µs of CPU per
command), and the connection count does not grow with the load.

Errors are redis-py's exception types, so callers and the app's 503 handler treat both alike. A
lost connection fails the commands in flight with ConnectionError and the next command reconnects;
a watchdog fails them with TimeoutError when Redis has answered nothing for `timeout_s`. Commands
are never retried: a retried rate-limit hit or LPUSH could count or queue twice.

Not for blocking commands or pub/sub, which need a connection of their own (api/waiter.py uses
redis-py for its one subscription).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int | float
CONNECT_ATTEMPTS = 4  # with 0.05, 0.1, 0.2 s between them: rides out a server restart's refused connects


class Script:
    """A Lua script run by its SHA1 (EVALSHA), loaded on first use by EVAL."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings (hiredis packs it in C: a third of the CPU of doing so
    in Python, for the six commands of a submit). TypeError for anything but str, bytes, int or float."""
    return hiredis.pack_command(tuple(args))  # type: ignore[arg-type]  # its stub says a 1-tuple


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        # Per request written and not yet answered, in order: its future and how many replies it awaits;
        # a single command's future gets its reply, a pipeline's the list of them (gathered in _replies).
        self._pending: deque[tuple[asyncio.Future[Any], int]] = deque()
        self._replies: list[Any] = []
        self._outgoing: list[bytes] = []  # written once per event-loop pass: one syscall for every request's
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._failure: Exception | None = None
        self.lost = False
        self.waiting_since = 0.0  # when the oldest unanswered command last saw progress

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of asyncio's

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        pending = self._pending
        try:
            while (reply := self._reader.gets()) is not False:
                future, count = pending[0]
                if count > 1:
                    self._replies.append(reply)
                    if len(self._replies) < count:
                        continue
                    reply, self._replies = self._replies, []
                pending.popleft()
                if not future.done():  # its caller may have been cancelled
                    future.set_result(reply)
        except (InvalidResponse, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.abort(InvalidResponse(f"Redis protocol error: {exc!r}"))
            return
        self.waiting_since = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        failure = self._failure or RedisConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}")
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(failure)

    def send(self, payload: bytes, count: int) -> asyncio.Future[Any]:
        """Queue `count` packed commands; the future gets the reply (count 1) or the list of replies."""
        if self.lost:
            raise RedisConnectionError("connection to Redis lost")
        future = self._loop.create_future()
        if not self._pending:
            self.waiting_since = time.monotonic()
        self._pending.append((future, count))
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(payload)
        return future

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self._transport is not None and not self.lost:
            self._transport.writelines(outgoing)

    def stalled(self, timeout_s: float) -> bool:
        return bool(self._pending) and time.monotonic() - self.waiting_since > timeout_s

    def abort(self, failure: Exception) -> None:
        self._failure = failure
        self.lost = True  # nothing more is sent; connection_lost follows and fails what is pending
        if self._transport is not None:
            self._transport.abort()


class RedisMux:
    def __init__(self, url: str, timeout_s: float = 5.0, connect_timeout_s: float = 5.0) -> None:
        self._options = parse_url(url)  # redis-py's reading of the URL, as the workers' clients read it
        self._tls = url.startswith("rediss://")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._connection: _Connection | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self.connects = 0  # connections opened so far (the tests read it)

    async def execute(self, *args: Arg) -> Any:
        return _raise_error(await self._send(pack(args), 1))

    async def pipeline(self, *commands: Sequence[Arg]) -> list[Any]:
        """Several commands in one write; their replies in order. The first error reply is raised."""
        if len(commands) == 1:  # a single command's reply comes alone (_Connection.send)
            return [await self.execute(*commands[0])]
        replies = await self._send(b"".join(pack(command) for command in commands), len(commands))
        return [_raise_error(reply) for reply in replies]

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # a fresh or restarted server: EVAL runs it and caches it under its SHA1
            return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._connection is not None and not self._connection.lost:
            self._connection.abort(RedisConnectionError("client closed"))
        self._connection = None

    async def _send(self, payload: bytes, count: int) -> Any:
        connection = self._connection
        if connection is None or connection.lost:
            connection = await self._reconnect()
        return await connection.send(payload, count)

    async def _reconnect(self) -> _Connection:
        async with self._connecting:
            if self._connection is not None and not self._connection.lost:
                return self._connection  # another request connected while this one waited
            delay = 0.05
            for attempt in range(CONNECT_ATTEMPTS):
                try:
                    async with asyncio.timeout(self.connect_timeout_s):
                        connection = await self._connect()
                    break
                except (OSError, RedisConnectionError) as exc:  # OSError: refused, or the builtin TimeoutError
                    if attempt == CONNECT_ATTEMPTS - 1:
                        raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from exc
                    await asyncio.sleep(delay)
                    delay *= 2
            self._connection = connection
            self.connects += 1
            if self._watchdog is None or self._watchdog.done():
                self._watchdog = asyncio.create_task(self._watch(), name="redis-watchdog")
            return connection

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        options = self._options
        if "path" in options:
            _, connection = await loop.create_unix_connection(_Connection, options["path"])
        else:
            _, connection = await loop.create_connection(
                _Connection,
                options.get("host", "localhost"),
                options.get("port", 6379),
                ssl=ssl.create_default_context() if self._tls else None,
            )
        setup: list[Sequence[Arg]] = []
        if "password" in options:
            setup.append(["AUTH", *([options["username"]] if "username" in options else []), options["password"]])
        if options.get("db"):
            setup.append(["SELECT", options["db"]])
        if setup:
            try:
                for command in setup:
                    _raise_error(await connection.send(pack(command), 1))
            except BaseException:
                connection.abort(RedisConnectionError("setup failed"))
                raise
        return connection

    async def _watch(self) -> None:
        """Fail a connection whose oldest command has had no answer for timeout_s (a hung server)."""
        while True:
            await asyncio.sleep(min(self.timeout_s / 4, 1.0))
            connection = self._connection
            if connection is not None and not connection.lost and connection.stalled(self.timeout_s):
                connection.abort(RedisTimeoutError(f"Redis answered nothing for {self.timeout_s:g} s"))


def _raise_error(reply: Any) -> Any:
    if isinstance(reply, ResponseError):
        if str(reply).startswith("NOSCRIPT"):
            raise NoScriptError(str(reply))
        raise reply
    return reply

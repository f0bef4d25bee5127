"""The API's multiplexed Redis client against the real Redis (and, for what Redis cannot be made to do, a
socket server of the test's own)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import pytest
import redis
import uvloop
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from api.redis_mux import RedisMux, Script, pack
from tests.stack import REDIS_URL


def run(scenario: Callable[[RedisMux], Awaitable[None]], url: str = REDIS_URL, **options: float) -> None:
    """On both event loops: uvloop, which the API runs on, and asyncio's own."""

    async def main() -> None:
        client = RedisMux(url, **options)
        try:
            await scenario(client)
        finally:
            await client.aclose()

    uvloop.run(main())
    asyncio.run(main())


def key() -> str:
    return f"mux-test:{secrets.token_hex(4)}"


def test_pack_writes_resp_bulk_strings() -> None:
    assert pack(["SET", b"k\r\n", 12, 1.5]) == b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n1.5\r\n"
    with pytest.raises(TypeError):
        pack(["SET", "k", True])
    with pytest.raises(TypeError):
        pack(["SET", "k", None])  # type: ignore[list-item]


def test_commands_pipelines_and_error_replies() -> None:
    async def scenario(client: RedisMux) -> None:
        k = key()
        assert await client.execute("SET", k, "v", "EX", 10) == b"OK"
        assert await client.execute("GET", k) == b"v"
        assert await client.pipeline(("INCR", k + "n"), ("INCR", k + "n"), ("DEL", k, k + "n")) == [1, 2, 2]
        assert await client.pipeline(("INCR", k + "n")) == [1]  # a pipeline of one is a list too
        await client.execute("DEL", k + "n")
        await client.execute("SET", k, "v")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await client.execute("LPUSH", k, "x")
        with pytest.raises(ResponseError, match="unknown command"):
            await client.pipeline(("PING",), ("NOSUCHCOMMAND",))
        assert await client.execute("PING") == b"PONG"  # the connection is still in step
        await client.execute("DEL", k)

    run(scenario)


def test_concurrent_callers_each_get_their_own_reply_on_one_connection() -> None:
    async def scenario(client: RedisMux) -> None:
        counter = key()
        replies = await asyncio.gather(*(client.execute("INCR", counter) for _ in range(2000)))
        assert sorted(replies) == list(range(1, 2001))
        echoes = await asyncio.gather(*(client.execute("ECHO", f"m{i}") for i in range(500)))
        assert echoes == [f"m{i}".encode() for i in range(500)]
        assert client.connects == 1
        await client.execute("DEL", counter)

    run(scenario)


def test_a_cancelled_caller_leaves_the_others_in_step() -> None:
    async def scenario(client: RedisMux) -> None:
        await client.execute("PING")
        slow = asyncio.create_task(client.execute("WAIT", 1, 200))  # no replica: blocks 200 ms
        await asyncio.sleep(0.05)
        slow.cancel()
        assert await client.execute("ECHO", "after") == b"after"

    run(scenario)


def test_scripts_load_themselves_on_a_server_that_lacks_them() -> None:
    async def scenario(client: RedisMux) -> None:
        script = Script(f"return {{KEYS[1], ARGV[1], '{secrets.token_hex(4)}'}}")
        redis.Redis.from_url(REDIS_URL).script_flush()
        with pytest.raises(NoScriptError):
            await client.execute("EVALSHA", script.sha, 0)
        first = await client.run(script, ["k"], ["a"])
        assert first[:2] == [b"k", b"a"]
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
        assert await client.run(script, ["k"], ["b"]) == [b"k", b"b", first[2]]

    run(scenario)


def test_a_lost_connection_fails_what_is_in_flight_and_the_next_command_reconnects() -> None:
    async def scenario(client: RedisMux) -> None:
        own_id = await client.execute("CLIENT", "ID")
        in_flight = asyncio.create_task(client.execute("WAIT", 1, 300))
        await asyncio.sleep(0.05)
        redis.Redis.from_url(REDIS_URL).client_kill_filter(_id=own_id)
        with pytest.raises(ConnectionError):
            await in_flight
        assert await client.execute("PING") == b"PONG"
        assert client.connects == 2

    run(scenario)


def test_an_unreachable_server_is_a_connection_error() -> None:
    async def scenario(client: RedisMux) -> None:
        with pytest.raises(ConnectionError):
            await client.execute("PING")

    run(scenario, url="redis://127.0.0.1:1/0", connect_timeout_s=0.5)


async def _silent_server(received: list[bytes], answer: bytes | None) -> tuple[asyncio.Server, int]:
    """A server that records what it is sent and answers every chunk with `answer` (None: never answers)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.append(data)
            if answer is not None:
                writer.write(answer * data.count(b"*"))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_a_server_that_stops_answering_times_out() -> None:
    async def main() -> None:
        server, port = await _silent_server([], None)
        client = RedisMux(f"redis://127.0.0.1:{port}", timeout_s=0.4)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await client.execute("PING")
        assert 0.4 <= loop.time() - started < 1.5
        await client.aclose()
        server.close()

    asyncio.run(main())


def test_the_url_credentials_and_database_are_sent_on_connect() -> None:
    async def main() -> None:
        received: list[bytes] = []
        server, port = await _silent_server(received, b"+OK\r\n")
        client = RedisMux(f"redis://ops:s3cret@127.0.0.1:{port}/7")
        assert await client.execute("PING") == b"OK"
        await client.aclose()
        server.close()
        assert b"".join(received) == pack(["AUTH", "ops", "s3cret"]) + pack(["SELECT", 7]) + pack(["PING"])

    asyncio.run(main())

"""Fetching a user's image or LoRA URL without letting it reach our own network (SSRF): core/netguard.py decides
each hop, redirects included (at most MAX_REDIRECTS).

The body is bounded in decoded bytes: httpx would decode a gzip or deflate body in one piece per network read
(a 64 KB read of zeros inflates to 64 MB before anyone counts it), so we read it raw and inflate it here, a MiB
at a time and never more than the bytes still allowed. Other content codings are refused. The body goes to a
`Sink` as it arrives (a LoRA's spool, api/services/loras.py), or into memory for `fetch` (images, which Pillow
reads whole, at most KLEIN_MAX_IMAGE_BYTES).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import zlib
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import urljoin

import httpx

from core.netguard import FetchError, IPAddress, pin, public, target

__all__ = ["MAX_REDIRECTS", "FetchError", "Sink", "check", "fetch", "fetch_into", "in_memory", "public"]
MAX_REDIRECTS = 3
ACCEPT_ENCODING = "gzip, deflate"
PIECE = 2**20  # bytes inflated at a time
# zlib's window bits: gzip's header and trailer; deflate as HTTP means it (zlib-wrapped).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise FetchError(f"cannot resolve host {host!r}") from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


class Sink(Protocol):
    """Where a body goes as it arrives; `write` may refuse it (an exception ends the fetch)."""

    async def write(self, chunk: bytes) -> None: ...


class Buffer:
    """A body held in memory."""

    def __init__(self) -> None:
        self.body = io.BytesIO()  # getvalue() hands over its buffer: the body is never held twice

    async def write(self, chunk: bytes) -> None:
        self.body.write(chunk)


async def in_memory(fill: Callable[[Sink], Awaitable[None]]) -> bytes:
    """What `fill` writes, held in memory; freed at once if it fails (not when its traceback is collected)."""
    buffer = Buffer()
    try:
        await fill(buffer)
    except BaseException:
        buffer.body.close()
        raise
    return buffer.body.getvalue()


async def fetch(url: str, max_bytes: int, timeout_s: float, allowlist: list[str]) -> bytes:
    """The decoded body, held in memory; FetchError says why not, for the client."""
    return await in_memory(lambda sink: fetch_into(url, sink, max_bytes, timeout_s, allowlist))


async def fetch_into(url: str, sink: Sink, max_bytes: int, timeout_s: float, allowlist: list[str]) -> None:
    """The decoded body into `sink` as it arrives; FetchError as soon as it passes `max_bytes` or fails."""
    try:
        async with (
            asyncio.timeout(timeout_s),
            # httpx's own default (5 s for each of connect, read, write, pool) would cut timeout_s short.
            httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout_s) as client,
        ):
            for _ in range(MAX_REDIRECTS + 1):
                location = await _get(client, url, sink, max_bytes, allowlist)
                if location is None:
                    return
                url = urljoin(url, location)
    except (TimeoutError, httpx.TimeoutException):  # httpx's timeout too means timeout_s has run out
        raise FetchError(f"fetching the URL took longer than {timeout_s:g} s") from None
    except httpx.ConnectError:
        raise FetchError("could not connect to the URL's host") from None
    except httpx.HTTPError:
        raise FetchError("the URL's server broke off the transfer or answered something that is not HTTP") from None
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


async def _get(client: httpx.AsyncClient, url: str, sink: Sink, max_bytes: int, allowlist: list[str]) -> str | None:
    """The Location of a redirect, or None once the body went to `sink`."""
    parsed, port = target(url)
    assert parsed.host
    pinned, headers, extensions = pin(parsed, await resolve(parsed.host, port), allowlist)
    headers |= {"Accept-Encoding": ACCEPT_ENCODING}
    request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
    response = await client.send(request, stream=True)
    try:
        if response.is_redirect and "location" in response.headers:
            return response.headers["location"]
        if response.status_code != 200:
            raise FetchError(f"the URL answered HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise FetchError(f"the URL's content is larger than {max_bytes} bytes")
        await _bounded_body(response, sink, max_bytes)
        return None
    finally:
        await response.aclose()


async def _bounded_body(response: httpx.Response, sink: Sink, max_bytes: int) -> None:
    """The decoded body into `sink`, as it streams; FetchError as soon as it would pass `max_bytes`."""
    codings = [c.strip().lower() for c in response.headers.get("content-encoding", "").split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if len(codings) > 1 or (codings and codings[0] not in _WBITS):
        raise FetchError(f"the URL's content is encoded as {', '.join(codings)}; only gzip or deflate are read")
    inflate: zlib._Decompress | None = None
    size = 0
    async for raw in response.aiter_raw():
        if codings and inflate is None:
            inflate = _inflater(codings[0], raw)
        pending = raw
        while pending:  # a network read of gzip may hold a thousand times its size: inflated a piece at a time
            try:
                chunk = pending if inflate is None else inflate.decompress(pending, min(max_bytes - size + 1, PIECE))
            except zlib.error:
                raise FetchError(f"the URL's content is not valid {codings[0]}") from None
            pending = b"" if inflate is None else inflate.unconsumed_tail
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"the URL's content is larger than {max_bytes} bytes")
            await sink.write(chunk)
            if pending:
                await asyncio.sleep(0)  # other requests' turn between pieces
    if codings and (inflate is None or not inflate.eof):
        raise FetchError(f"the URL's content ends before its {codings[0]} stream does")


def _inflater(coding: str, first: bytes) -> zlib._Decompress:
    """zlib's inflater for the coding; deflate as the standard says (zlib-wrapped) or bare, as some servers send."""
    wrapped = len(first) >= 2 and first[0] & 0x0F == 8 and int.from_bytes(first[:2], "big") % 31 == 0
    return zlib.decompressobj(_WBITS[coding] if coding != "deflate" or wrapped else -zlib.MAX_WBITS)


async def check(url: str, allowlist: list[str]) -> None:
    """FetchError unless the URL may be reached from here now (a webhook receiver, at submit)."""
    parsed, port = target(url)
    assert parsed.host
    pin(parsed, await resolve(parsed.host, port), allowlist)

"""Fetching a user's image URL without letting it reach our own network (SSRF): core/netguard.py decides
each hop, redirects included (at most MAX_REDIRECTS)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin

import httpx

from core.netguard import FetchError, IPAddress, pin, public, target

__all__ = ["MAX_REDIRECTS", "FetchError", "check", "fetch", "public"]
MAX_REDIRECTS = 3


async def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise FetchError(f"cannot resolve host {host!r}") from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


async def fetch(url: str, max_bytes: int, timeout_s: float, allowlist: list[str]) -> bytes:
    try:
        async with (
            asyncio.timeout(timeout_s),
            # httpx's own default (5 s for each of connect, read, write, pool) would cut timeout_s short.
            httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout_s) as client,
        ):
            for _ in range(MAX_REDIRECTS + 1):
                location = await _get(client, url, max_bytes, allowlist)
                if isinstance(location, bytes):
                    return location
                url = urljoin(url, location)
    except (TimeoutError, httpx.TimeoutException):  # httpx's timeout too means timeout_s has run out
        raise FetchError(f"fetching the URL took longer than {timeout_s:g} s") from None
    except httpx.ConnectError:
        raise FetchError("could not connect to the URL's host") from None
    except httpx.HTTPError:
        raise FetchError("the URL's server broke off the transfer or answered something that is not HTTP") from None
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


async def _get(client: httpx.AsyncClient, url: str, max_bytes: int, allowlist: list[str]) -> bytes | str:
    """The body, or the Location of a redirect."""
    parsed, port = target(url)
    assert parsed.host
    pinned, headers, extensions = pin(parsed, await resolve(parsed.host, port), allowlist)
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
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise FetchError(f"the URL's content is larger than {max_bytes} bytes")
        return bytes(body)
    finally:
        await response.aclose()


async def check(url: str, allowlist: list[str]) -> None:
    """FetchError unless the URL may be reached from here now (a webhook receiver, at submit)."""
    parsed, port = target(url)
    assert parsed.host
    pin(parsed, await resolve(parsed.host, port), allowlist)

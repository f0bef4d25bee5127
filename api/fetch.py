"""Fetching a user's image URL without letting it reach our own network (SSRF).

Every hop (redirects included) is resolved first and refused if any address is not public —
loopback, private, link-local (cloud metadata), carrier-grade NAT, multicast, reserved — unless
the host or its network is on the allowlist. The request then goes to the address that was
checked (no second DNS lookup to rebind), with the original Host header and TLS server name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin

import httpx

MAX_REDIRECTS = 3
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(ValueError):
    """The URL cannot be used; the message says why, for the client."""


def _public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _allowed(host: str, ips: list[IPAddress], allowlist: list[str]) -> bool:
    if host.lower() in (entry.lower() for entry in allowlist):
        return True
    networks = []
    for entry in allowlist:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue  # a host name entry
    return all(any(ip in network for network in networks) for ip in ips)


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise FetchError(f"cannot resolve host {host!r}") from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


async def fetch(url: str, max_bytes: int, timeout_s: float, allowlist: list[str]) -> bytes:
    try:
        async with asyncio.timeout(timeout_s), httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                location = await _get(client, url, max_bytes, allowlist)
                if isinstance(location, bytes):
                    return location
                url = urljoin(url, location)
    except TimeoutError:
        raise FetchError(f"fetching the URL took longer than {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"could not fetch the URL: {type(exc).__name__}") from None
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


async def _get(client: httpx.AsyncClient, url: str, max_bytes: int, allowlist: list[str]) -> bytes | str:
    """The body, or the Location of a redirect."""
    target = httpx.URL(url)
    if target.scheme not in ("http", "https") or not target.host:
        raise FetchError("only http and https URLs can be fetched")
    port = target.port or (443 if target.scheme == "https" else 80)
    ips = await _resolve(target.host, port)
    if not _allowed(target.host, ips, allowlist) and not all(_public(ip) for ip in ips):
        raise FetchError(f"URL host {target.host!r} resolves to a non-public address")
    pinned = target.copy_with(host=str(ips[0]))
    host_header = target.host if target.port is None else f"{target.host}:{target.port}"
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    request = client.build_request("GET", pinned, headers={"Host": host_header}, extensions=extensions)
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

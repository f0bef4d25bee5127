"""Fetching a user's image URL without letting it reach our own network (SSRF).

Every hop (redirects included) is resolved first and refused if any address is not public —
loopback, private, link-local (cloud metadata), carrier-grade NAT, multicast, reserved, site-local,
or an IPv6 form that embeds such an IPv4 address (NAT64, 6to4, Teredo, ...; see _public) — unless
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


# IPv6 prefixes whose last 32 bits are an IPv4 address the packet ends up at.
_IPV4_IN_LAST_32_BITS = [
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (RFC 2765, RFC 6052)
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated; :: and ::1 embed 0.0.0.0 and 0.0.0.1)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
]
# NAT64 local-use prefix (RFC 8215): not globally reachable, and the IPv4 address sits where the
# operator's prefix length puts it, so it cannot be read reliably. Refused unless allowlisted.
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")


def _public(ip: IPAddress) -> bool:
    """Whether ip is globally reachable and not multicast, and so is every IPv4 address it embeds.

    IPv6 forms that carry an IPv4 address, each judged by that address too:
    IPv4-mapped ::ffff:a.b.c.d (judged by the IPv4 address alone, as the socket connects over IPv4),
    IPv4-translated ::ffff:0:a.b.c.d, IPv4-compatible ::a.b.c.d, NAT64 64:ff9b::a.b.c.d,
    6to4 2002:AABB:CCDD::/48, and Teredo 2001::/32 (its server and its de-obfuscated client).
    Also refused: site-local fec0::/10 and the NAT64 local-use prefix 64:ff9b:1::/48.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    addresses: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local or ip in _NAT64_LOCAL_USE:
            return False
        if any(ip in prefix for prefix in _IPV4_IN_LAST_32_BITS):
            addresses.append(ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF))
        if ip.sixtofour is not None:
            addresses.append(ip.sixtofour)
        addresses.extend(ip.teredo or ())
    return all(address.is_global and not address.is_multicast for address in addresses)


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

"""The SSRF guard: may a URL given by a user (a reference image, a webhook receiver) be reached from our network?

Every hop (redirects included) is resolved first and refused if any address is not public —
loopback, private, link-local (cloud metadata), carrier-grade NAT, multicast, reserved, site-local,
or an IPv6 form that embeds such an IPv4 address (NAT64, 6to4, Teredo, ...; see public) — unless
the host or its network is on the allowlist. The request then goes to the address that was
checked (no second DNS lookup to rebind), with the original Host header and TLS server name.
Callers resolve (asynchronously in the API, synchronously in the webhook worker) and call `pin`.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import httpx

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


def public(ip: IPAddress) -> bool:
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


def allowed(host: str, ips: list[IPAddress], allowlist: list[str]) -> bool:
    if host.lower() in (entry.lower() for entry in allowlist):
        return True
    networks = []
    for entry in allowlist:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue  # a host name entry
    return all(any(ip in network for network in networks) for ip in ips)


def target(url: str) -> tuple[httpx.URL, int]:
    """The parsed URL and its port; FetchError unless it is an absolute http(s) URL."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise FetchError("not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise FetchError("only http and https URLs can be used")
    return parsed, parsed.port or (443 if parsed.scheme == "https" else 80)


def resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses, resolved synchronously (the webhook worker's threads)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise FetchError(f"cannot resolve host {host!r}") from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def pin(url: httpx.URL, ips: list[IPAddress], allowlist: list[str]) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """(the URL at the checked address, its Host header, its TLS server name) — FetchError if any address
    is not public and the host is not allowlisted."""
    assert url.host
    if not allowed(url.host, ips, allowlist) and not all(public(ip) for ip in ips):
        raise FetchError(f"URL host {url.host!r} resolves to a non-public address")
    host_header = url.host if url.port is None else f"{url.host}:{url.port}"
    extensions: dict[str, Any] = {"sni_hostname": url.host} if url.scheme == "https" else {}
    return url.copy_with(host=str(ips[0])), {"Host": host_header}, extensions

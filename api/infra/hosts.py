"""Only the Host headers we were told about (KLEIN_ALLOWED_HOSTS, KLEIN_PUBLIC_BASE_URL's host): our URLs are built
from the Host when no public base URL is set (api/context.py), so a forged one must never reach a route.

The patterns of Starlette's TrustedHostMiddleware (exact, '*.example.com', '*'), with a refusal that says which
setting admits a host (the forged host is not echoed back)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

REFUSAL = (
    "Invalid host header: this server answers only the hosts in its KLEIN_ALLOWED_HOSTS setting (and "
    "KLEIN_PUBLIC_BASE_URL's host). Add the name or address you reach it by there and restart it.\n"
)


_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::[0-9]{1,5})?")


def host_of(header: str | None) -> str | None:
    """The lower-cased host of a Host header ("Example.com:8000" → "example.com", "[::1]:80" → "::1"); None for
    anything else (user info, paths, spaces: nothing that could shape a URL of ours)."""
    match = _HOST.fullmatch(header or "")
    if match is None:
        return None
    if match["ipv6"] is not None:
        try:
            return str(ipaddress.IPv6Address(match["ipv6"]))
        except ValueError:
            return None
    return match["name"].lower()


def allowed(host: str, patterns: Sequence[str]) -> bool:
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)


class TrustedHosts:
    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        for pattern in allowed_hosts:
            if "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")):
                raise ValueError(f"allowed host {pattern!r}: a wildcard is '*' or like '*.example.com'")
        self.app = app
        self.patterns = [pattern.lower().strip("[]") for pattern in allowed_hosts]  # "[::1]" as "::1"
        self.allow_any = "*" in self.patterns

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.allow_any and scope["type"] in ("http", "websocket"):
            host = host_of(Headers(scope=scope).get("host"))
            if host is None or not allowed(host, self.patterns):
                await PlainTextResponse(REFUSAL, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)

"""api/infra/fetch.py: the SSRF guard on IPv6 forms that embed an IPv4 address, the fetch timeout, and the body's
bound in decoded bytes (gzip and deflate inflated as they stream, never past the bound).

No PostgreSQL or Redis needed: fetch() is called directly, against real HTTP servers on 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from api.infra.fetch import FetchError, fetch
from core.netguard import public as _public

LOOPBACK = "127.0.0.2"
ALLOW_LOOPBACK = [f"{LOOPBACK}/32"]
SLOW_S = 6.0  # longer than httpx's 5 s default timeout


def _gzip_of_zeros(mib: int) -> bytes:
    """A gzip bomb: `mib` MiB of zeros in about a thousandth of that."""
    deflate, zeros = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS), bytes(2**20)
    return b"".join(deflate.compress(zeros) for _ in range(mib)) + deflate.flush()


BOMB_MIB = 64
ENCODED = {  # path → (Content-Encoding, body)
    "/bomb": ("gzip", _gzip_of_zeros(BOMB_MIB)),
    "/gzip": ("gzip", gzip.compress(b"image-bytes")),
    "/deflate": ("deflate", zlib.compress(b"image-bytes")),
    "/bare-deflate": ("deflate", zlib.compress(b"image-bytes", wbits=-zlib.MAX_WBITS)),
    "/brotli": ("br", b"\x0b\x05\x80image-bytes\x03"),
    "/cut-gzip": ("gzip", gzip.compress(b"image-bytes" * 100)[:40]),
}

# (address, what it reaches): every one must be refused.
REFUSED = [
    ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1"),
    ("64:ff9b::a00:1", "NAT64 of 10.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254 (cloud metadata)"),
    ("64:ff9b::e000:1", "NAT64 of 224.0.0.1 (multicast)"),
    ("64:ff9b:1::7f00:1", "NAT64 local-use prefix (RFC 8215), 127.0.0.1"),
    ("64:ff9b:1::808:808", "NAT64 local-use prefix (RFC 8215): refused whatever it embeds"),
    ("2002:7f00:1::", "6to4 of 127.0.0.1"),
    ("2002:a9fe:a9fe::1", "6to4 of 169.254.169.254"),
    ("::7f00:1", "IPv4-compatible 127.0.0.1"),
    ("::a00:1", "IPv4-compatible 10.0.0.1"),
    ("::ffff:0:7f00:1", "IPv4-translated 127.0.0.1"),
    ("::ffff:0:a9fe:a9fe", "IPv4-translated 169.254.169.254"),
    ("::ffff:7f00:1", "IPv4-mapped 127.0.0.1"),
    ("fec0::1", "site-local"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo, client 127.0.0.1"),
    ("2001:0:7f00:1::1", "Teredo, server 127.0.0.1"),
    ("::1", "loopback"),
    ("fe80::1", "link-local"),
    ("fc00::1", "unique local"),
    ("127.0.0.1", "IPv4 loopback"),
]

# Python 3.11.10+ (CVE-2024-4032) counts all of 2002::/16 as not globally reachable; older ones do not.
_SIXTOFOUR_PUBLIC = "2002:808:808::1"
ALLOWED = [
    pytest.param("2606:4700::1111", id="2606:4700::1111"),
    pytest.param("64:ff9b::808:808", id="NAT64 of 8.8.8.8"),
    pytest.param("::ffff:808:808", id="IPv4-mapped 8.8.8.8"),
    pytest.param("::ffff:0:808:808", id="IPv4-translated 8.8.8.8"),
    pytest.param(
        _SIXTOFOUR_PUBLIC,
        id="6to4 of 8.8.8.8",
        marks=pytest.mark.skipif(
            not ipaddress.ip_address(_SIXTOFOUR_PUBLIC).is_global, reason="this Python refuses all of 2002::/16"
        ),
    ),
    pytest.param("1.1.1.1", id="1.1.1.1"),
]


@pytest.mark.parametrize(("address", "what"), REFUSED, ids=[what for _, what in REFUSED])
def test_embedded_non_public_ipv4_is_refused(address: str, what: str) -> None:
    assert not _public(ipaddress.ip_address(address)), what


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_stay_allowed(address: str) -> None:
    assert _public(ipaddress.ip_address(address))


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


@pytest.mark.parametrize(("address", "what"), REFUSED, ids=[what for _, what in REFUSED])
def test_fetch_refuses_literal_host_before_connecting(address: str, what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_connection(*args: Any, **kwargs: Any) -> httpx.Response:
        raise AssertionError(f"fetch tried to connect to {address} ({what})")

    monkeypatch.setattr(httpx.AsyncClient, "send", no_connection)
    with pytest.raises(FetchError, match="non-public"):
        asyncio.run(fetch(f"http://{_url_host(address)}/x.png", 1000, 5, allowlist=[]))


class _Handler(BaseHTTPRequestHandler):
    """/redirect?to=ADDRESS: 302 to ADDRESS on this port; /slow: SLOW_S s, then a body; else a body."""

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/redirect":
            target = parse_qs(parts.query)["to"][0]
            self.send_response(302)
            self.send_header("Location", f"http://{_url_host(target)}:{self.connection.getsockname()[1]}/x.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if parts.path == "/slow":
            time.sleep(SLOW_S)
        body = b"image-bytes"
        self.send_response(200)
        if parts.path in ENCODED:
            encoding, body = ENCODED[parts.path]
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer((LOOPBACK, 0), _Handler)
    httpd.daemon_threads = True  # a /slow answer still sleeping does not hold the test run
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_redirect_within_the_allowlist_is_followed(server: str) -> None:
    assert asyncio.run(fetch(f"{server}/redirect?to={LOOPBACK}", 1000, 5, ALLOW_LOOPBACK)) == b"image-bytes"


@pytest.mark.parametrize(("address", "what"), REFUSED, ids=[what for _, what in REFUSED])
def test_redirect_to_embedded_non_public_ipv4_is_refused(server: str, address: str, what: str) -> None:
    with pytest.raises(FetchError, match="non-public"):
        asyncio.run(fetch(f"{server}/redirect?to={address}", 1000, 5, ALLOW_LOOPBACK))


def test_fetch_waits_up_to_timeout_s_not_httpx_default(server: str) -> None:
    started = time.monotonic()
    assert asyncio.run(fetch(f"{server}/slow", 1000, 10, ALLOW_LOOPBACK)) == b"image-bytes"
    assert time.monotonic() - started >= SLOW_S - 0.5


def test_fetch_gives_up_after_timeout_s(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError, match="took longer than 2 s"):
        asyncio.run(fetch(f"{server}/slow", 1000, 2, ALLOW_LOOPBACK))
    assert time.monotonic() - started < SLOW_S - 1


def test_a_gzip_bomb_is_refused_at_the_bound_in_decoded_bytes_without_inflating_past_it(server: str) -> None:
    """64 MiB of zeros in 64 KB of gzip, against a bound of 1 MiB: the fetch stops at the bound, having allocated
    a few times the bound (the body, its last piece, the HTTP client's own setup), where httpx's transparent
    decoding inflates each network read whole: the first one to 64 MiB."""
    assert len(ENCODED["/bomb"][1]) < 2**20 // 8
    tracemalloc.start()
    try:
        with pytest.raises(FetchError, match="larger than 1048576 bytes"):
            asyncio.run(fetch(f"{server}/bomb", 2**20, 10, ALLOW_LOOPBACK))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB allocated while fetching"


@pytest.mark.parametrize("path", ["/gzip", "/deflate", "/bare-deflate"])
def test_gzip_and_deflate_bodies_are_read_decoded(server: str, path: str) -> None:
    assert asyncio.run(fetch(f"{server}{path}", 1000, 5, ALLOW_LOOPBACK)) == b"image-bytes"
    with pytest.raises(FetchError, match="larger than 5 bytes"):
        asyncio.run(fetch(f"{server}{path}", 5, 5, ALLOW_LOOPBACK))


def test_other_content_codings_and_cut_streams_are_refused(server: str) -> None:
    with pytest.raises(FetchError, match="encoded as br; only gzip or deflate"):
        asyncio.run(fetch(f"{server}/brotli", 1000, 5, ALLOW_LOOPBACK))
    with pytest.raises(FetchError, match="ends before its gzip stream does"):
        asyncio.run(fetch(f"{server}/cut-gzip", 10_000, 5, ALLOW_LOOPBACK))

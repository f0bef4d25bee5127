"""The Host check (api/infra/hosts.py): what counts as a host, and which ones are let through."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from api.infra.hosts import REFUSAL, TrustedHosts, host_of

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("Example.com:8000", "example.com"),
        ("10.1.2.3", "10.1.2.3"),
        ("[::1]:8000", "::1"),
        ("[0:0::1]", "::1"),
        ("evil@localhost", None),  # user info would shape a URL built from the Host
        ("localhost/x", None),
        ("localhost:80:80", None),
        ("[zz::]", None),
        ("a b", None),
        ("", None),
    ],
)
def test_host_of(header: str, host: str | None) -> None:
    assert host_of(header) == host


def test_only_the_allowed_hosts_reach_the_app_and_the_refusal_names_the_setting() -> None:
    app = TrustedHosts(
        Starlette(routes=[Route("/", lambda _: PlainTextResponse("ok"))]),
        allowed_hosts=["localhost", "10.1.2.3", "*.example.com", "[::1]"],
    )
    with TestClient(app) as client:
        for host in ("localhost:8000", "10.1.2.3", "api.example.com", "[::1]:8000"):
            assert client.get("/", headers={"host": host}).text == "ok", host
        for host in ("example.com.evil", "evil.com", "x@localhost", "10.1.2.4"):
            refused = client.get("/", headers={"host": host})
            assert (refused.status_code, refused.text) == (400, REFUSAL), host
            assert "evil" not in refused.text


def test_a_malformed_wildcard_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        TrustedHosts(Starlette(), allowed_hosts=["api.*.com"])

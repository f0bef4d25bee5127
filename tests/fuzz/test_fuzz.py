"""Property-based fuzzing of every operation in /openapi.json with schemathesis.

Each response must not be a server error (5xx) and must match what the schema documents: the status,
the content type and the body (`status_code_conformance`, `content_type_conformance`,
`response_schema_conformance`, `not_a_server_error`). The one 5xx allowed is the documented 504 of
the synchronous dialects (`POST /v1/generate`, `POST /v1/images/generations`) when a generation
outlasts `KLEIN_TRY_SYNC_TIMEOUT_S`: the fuzz API runs with 0.5 s so that they answer fast. The fuzz
tenant may hold one prediction in flight, so most valid submissions get a quick 429 and the single
CPU worker is never flooded.

Three passes: every operation with a valid tenant key (and the admin key for /admin/v1); then a
few operations of each kind without a key and with an invalid one, which must answer 401 (or a
4xx the framework gives before authentication), never 5xx.

`pytest -s tests/fuzz` prints a `FUZZ SUMMARY` line when the module is done; the same figures go to
`fuzz-summary.json` in the pytest base temp dir. The cases are the same on every run; set
`KLEIN_FUZZ_SEED` to explore others.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from schemathesis import Case, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ops.embedded import start_api
from tests.conftest import ADMIN_KEY, Stack, make_tenant

SEED = int(os.environ.get("KLEIN_FUZZ_SEED", "20260101"))
MAX_EXAMPLES = 40  # fuzzing-phase cases per operation; the examples and coverage phases add their own
GENERATION_MAX_EXAMPLES = 12  # operations that submit image generations (and prompt rewrites)
UNAUTHENTICATED_MAX_EXAMPLES = 25  # per operation in each pass without a valid key (fuzzing phase only)
GENERATIONS = (
    *("/v1/predictions", "/v1/generate", "/v1/images/generations", "/api/features", "/api/v3/{model_path}"),
    *("/fal-ai/{app_path}", "/fal-run/fal-ai/{app_path}", "/v1/{model}", "/v1/prompts/enhance"),
)
SYNC_504 = {
    "POST /v1/generate",
    "POST /v1/images/generations",
    "POST /fal-run/fal-ai/{app_path}",
}  # documented: past the generation time limit
BFL_PATHS = ("/v1/{model}", "/v1/get_result")
REQUEST_TIMEOUT_S = 20
SCHEMA_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
# A few operations of each kind (every dialect, files, account, admin) for the passes without a valid key.
UNAUTHENTICATED = (
    "^/v1/predictions$|^/v1/predictions/status/|^/v1/generate$|^/v1/images/generations$|^/api/features$"
    "|^/api/v3/|^/fal-ai/|^/fal-run/|^/v1/\\{model\\}$|^/v1/get_result$"
    "|^/v1/files$|^/v1/keys$|^/v1/usage$|^/admin/v1/tenants$|^/admin/v1/tenants/[^/]+$"
)


def _label(case: Case) -> str:
    return f"{case.operation.method.upper()} {case.operation.path}"


@dataclass
class Tally:
    """What the fuzz passes sent and got back, over every test in this module."""

    started: float | None = None
    finished: float = 0.0
    operations: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    passes: Counter[str] = field(default_factory=Counter)
    phases: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)

    def record(self, run: str, case: Case, response: Response) -> None:
        self.started = self.started or time.monotonic() - response.elapsed
        self.finished = time.monotonic()
        self.operations.add(_label(case))
        self.statuses[response.status_code] += 1
        self.passes[run] += 1
        self.phases[case.meta.phase.name.value if case.meta else "explicit"] += 1
        if response.status_code >= 500 and not (response.status_code == 504 and _label(case) in SYNC_504):
            self.server_errors.append(f"{response.status_code} {_label(case)}: {response.text_lossy()[:200]}")

    def summary(self) -> dict[str, Any]:
        return {
            "operations": len(self.operations),
            "requests": self.statuses.total(),
            "server_errors_5xx": len(self.server_errors),
            "sync_timeouts_504": self.statuses[504] - sum(e.startswith("504 ") for e in self.server_errors),
            "seconds": round(self.finished - self.started, 1) if self.started else 0.0,
            "seed": SEED,
            "requests_by_pass": dict(self.passes),
            "requests_by_phase": dict(self.phases),
            "statuses": {str(code): n for code, n in sorted(self.statuses.items())},
            "server_errors": self.server_errors[:20],
        }


TALLY = Tally()


@dataclass
class Target:
    url: str
    tenant_key: str
    operations: set[str]


@pytest.fixture(scope="module")
def fuzz_target(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A separate API process with a 0.5 s sync wait, and a tenant that may hold one prediction in flight."""
    api, url = start_api(stack.env | {"KLEIN_TRY_SYNC_TIMEOUT_S": "0.5"}, stack.logs / "fuzz-api.log")
    try:
        tenant = make_tenant(stack.engine, max_in_flight=1)
        paths = requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]
        target = Target(
            url, tenant.key, {f"{method.upper()} {path}" for path, item in paths.items() for method in item}
        )
        yield target
    finally:
        api.stop()
    _report(target, tmp_path_factory)


def _report(target: Target, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The figures of whichever passes ran, printed and written to fuzz-summary.json once the module is done.
    Nothing is asserted here: each case checks its own answer, whatever order the cases run in."""
    summary = TALLY.summary()
    summary["operations_in_schema"] = len(target.operations)
    path = tmp_path_factory.getbasetemp() / "fuzz-summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\nFUZZ SUMMARY: {summary['operations']} of {summary['operations_in_schema']} operations, "
        f"{summary['requests']} requests, {summary['server_errors_5xx']} server errors (5xx), "
        f"{summary['sync_timeouts_504']} sync-timeout 504s, {summary['seconds']} s"
        f"\n  by pass: {summary['requests_by_pass']}\n  by phase: {summary['requests_by_phase']}"
        f"\n  statuses: {summary['statuses']}\n  written to {path}"
    )


def _schema(target: Target, headers: dict[str, str], admin_headers: dict[str, str], authenticated: bool) -> Any:
    operations: list[dict[str, Any]] = [{"include-path-regex": "^/admin/", "headers": admin_headers}]
    if authenticated:
        phases: dict[str, Any] = {"stateful": {"enabled": False}}
        max_examples = MAX_EXAMPLES
        generations = {"max-examples": GENERATION_MAX_EXAMPLES}
        operations.append({"include-path": list(GENERATIONS), "generation": generations})
    else:
        phases = {"stateful": {"enabled": False}, "coverage": {"enabled": False}}
        max_examples = UNAUTHENTICATED_MAX_EXAMPLES
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["all"],
            "base-url": target.url,
            "headers": headers,
            "request-timeout": REQUEST_TIMEOUT_S,
            "phases": phases,
            "generation": {"max-examples": max_examples, "no-shrink": True, "database": "none"},
            "operations": operations,
        }
    )
    return schemathesis.openapi.from_url(f"{target.url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def valid_keys_schema(fuzz_target: Target) -> Any:
    return _schema(fuzz_target, {"apikey": fuzz_target.tenant_key}, {"X-Admin-Key": ADMIN_KEY}, authenticated=True)


@pytest.fixture(scope="module")
def no_key_schema(fuzz_target: Target) -> Any:
    return _schema(fuzz_target, {}, {}, authenticated=False)


@pytest.fixture(scope="module")
def invalid_key_schema(fuzz_target: Target) -> Any:
    bad = {"apikey": "kl_" + "x" * 43}
    return _schema(fuzz_target, bad, {"X-Admin-Key": "not-the-admin-key"}, authenticated=False)


@pytest.fixture(autouse=True)
def _schemathesis_node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32 names each operation's subtest through `Function._nodeid`, which pytest 9.2 dropped."""
    node: Any = request.node
    if not hasattr(node, "_nodeid"):
        node._nodeid = node.nodeid


def _call_and_check(run: str, case: Case) -> Response:
    response = case.call(timeout=REQUEST_TIMEOUT_S)
    TALLY.record(run, case, response)
    checks = list(SCHEMA_CHECKS)
    if not (response.status_code == 504 and _label(case) in SYNC_504):
        checks.append(not_a_server_error)
    case.validate_response(response, checks=checks)
    return response


def _expect_401(case: Case, response: Response) -> None:
    # Answered before authentication: a body that cannot be decoded (400) or parsed as JSON (422); on the admin
    # routes, 429 once this address has sent too many wrong admin keys (as the pass with an invalid key does).
    path = _label(case).split(" ", 1)[1]
    refused = 403 if path in BFL_PATHS else 401  # BFL answers a missing or wrong x-key 403, as BFL does
    allowed = (400, refused, 422, 429) if path.startswith("/admin/") else (400, refused, 422)
    assert response.status_code in allowed, f"{_label(case)}: {response.status_code} {response.text_lossy()[:200]}"


valid_keys = schemathesis.pytest.from_fixture("valid_keys_schema")
no_key = schemathesis.pytest.from_fixture("no_key_schema").include(path_regex=UNAUTHENTICATED)
invalid_key = schemathesis.pytest.from_fixture("invalid_key_schema").include(path_regex=UNAUTHENTICATED)


@valid_keys.parametrize()
def test_every_operation_with_valid_keys(case: Case) -> None:
    _call_and_check("valid keys", case)


@no_key.parametrize()
def test_without_a_key_is_401_never_5xx(case: Case) -> None:
    _expect_401(case, _call_and_check("no key", case))


@invalid_key.parametrize()
def test_with_an_invalid_key_is_401_never_5xx(case: Case) -> None:
    _expect_401(case, _call_and_check("invalid key", case))


# Inputs the fuzzer found answered 5xx (or in the wrong dialect's shape), pinned so they stay fixed
# whatever cases a seed draws: (method, path, request arguments, status, the body's keys).
NUL = "a\u0000b"
WAVESPEED = "/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image"
FEATURES = {"type": "IMAGE_GENERATOR", "model": "flux-klein-4b", "promptObject": {"prompt": NUL}}
FOUND: list[tuple[str, str, dict[str, Any], int, set[str]]] = [
    (
        "POST",
        "/v1/predictions",
        {"headers": {"Model": "flux-klein-4b"}, "json": {"input": {"prompt": NUL}}},
        422,
        {"error"},
    ),
    ("GET", "/v1/predictions/status/a%00b", {}, 422, {"error"}),
    ("POST", "/v1/keys", {"json": {"name": NUL}}, 422, {"error"}),
    ("POST", "/v1/generate", {"json": {"prompt": NUL}}, 422, {"detail"}),
    ("POST", "/v1/generate", {"content": b"x", "headers": {"Content-Type": "multipart/form-data"}}, 400, {"detail"}),
    ("POST", WAVESPEED, {"json": {"prompt": NUL}}, 422, {"code", "message", "data"}),
    ("POST", "/v1/images/generations", {"json": {"prompt": NUL}}, 422, {"error"}),
    ("POST", "/api/features", {"json": FEATURES}, 422, {"error"}),
    ("GET", "/v1/usage", {"params": {"end": "0001-01-01"}}, 422, {"error"}),
    (
        "GET",
        "/v1/predictions/delivery/x/y.png",
        {"params": {"expires": 2**40, "signature": "ü"}, "auth": False},
        403,
        {"error"},
    ),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "keys"), FOUND, ids=[f"{m} {p}" for m, p, *_ in FOUND])
def test_what_the_fuzzer_found_is_a_4xx_in_the_dialects_shape(
    stack: Stack, fuzz_target: Target, method: str, path: str, kwargs: dict[str, Any], status: int, keys: set[str]
) -> None:
    """NUL characters were 503 "database unavailable"; a non-ASCII signature and a year-1 date were 500."""
    kwargs = dict(kwargs)
    headers = {"apikey": make_tenant(stack.engine).key} if kwargs.pop("auth", True) else {}
    headers |= kwargs.pop("headers", {})
    response = httpx.request(method, fuzz_target.url + path, headers=headers, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert set(response.json()) == keys


def test_admin_keys_of_a_tenant_named_in_the_path_and_an_empty_patch(fuzz_target: Target) -> None:
    """A key issued through a tenant's name was an FK violation (503); PATCH {} was invalid SQL (503)."""
    # From 127.0.0.4: a client address of its own, apart from the passes with wrong admin keys.
    transport = httpx.HTTPTransport(local_address="127.0.0.4")
    admin_url, headers = f"{fuzz_target.url}/admin/v1", {"X-Admin-Key": ADMIN_KEY}
    with httpx.Client(base_url=admin_url, headers=headers, timeout=30, transport=transport) as admin:
        name = f"fuzz-found-{time.time_ns()}"
        tenant = admin.post("/tenants", json={"name": name}).json()["tenant"]
        issued = admin.post(f"/tenants/{name}/keys", json={"name": "by-name"})
        assert issued.status_code == 201, issued.text
        assert issued.json()["tenant_id"] == tenant["id"]
        assert [key["name"] for key in admin.get(f"/tenants/{name}/keys").json()["data"]] == ["default", "by-name"]
        unchanged = admin.patch(f"/tenants/{tenant['id']}", json={})
        assert unchanged.status_code == 200, unchanged.text
        assert unchanged.json()["max_in_flight"] == tenant["max_in_flight"]

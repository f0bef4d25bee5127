"""The one error policy (api/errors.py), without services: each kind of error has one status and its headers."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
from botocore.exceptions import EndpointConnectionError
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from api import errors
from api.errors import ANSWERS, Answer, answer


def raised_in(module: str, exc: BaseException) -> BaseException:
    """`exc` as if raised by code of `module` (its traceback then passes through that module's frame)."""
    namespace: dict[str, Any] = {"__name__": module}
    exec("def fail(exc):\n    raise exc\n", namespace)
    try:
        namespace["fail"](exc)
    except BaseException as caught:
        return caught
    raise AssertionError("not raised")


@pytest.mark.parametrize("kind", list(ANSWERS))
def test_every_kind_of_service_error_has_its_status(kind: type[errors.ServiceError]) -> None:
    got = answer(kind("what is wrong", retry_after=3, field="x"))
    assert got == Answer(ANSWERS[kind], "what is wrong", {"field": "x"}, {"Retry-After": "3"})


def test_a_dependency_that_fails_is_a_503_naming_it() -> None:
    cases = {
        "database": OperationalError("SELECT 1", {}, Exception("server closed the connection")),
        "queue": RedisConnectionError("refused"),
        "storage": EndpointConnectionError(endpoint_url="http://s3"),
    }
    for dependency, exc in cases.items():
        got = answer(exc)
        assert got is not None and got.status == 503 and got.headers == {"Retry-After": "1"}
        assert got.message == f"{dependency} unavailable, try again shortly"
    refused = raised_in("asyncpg.connect_utils", ConnectionRefusedError(111, "refused"))
    assert (got := answer(refused)) is not None and got.message.startswith("database unavailable")


def test_an_os_error_of_our_own_is_a_fault_not_a_database_outage() -> None:
    assert answer(raised_in("api.infra.objects", FileNotFoundError("/tmp/x"))) is None  # a 500, logged
    assert answer(asyncpg.exceptions.UntranslatableCharacterError("\\u0000")) == Answer(
        422, "invalid request: a value cannot be stored, e.g. text with a NUL character"
    )


def test_json_nested_too_deeply_is_invalid_and_other_recursion_is_a_fault() -> None:
    try:
        json.loads("[" * 100_000 + "]" * 100_000)
    except RecursionError as exc:
        assert (got := answer(exc)) is not None and (got.status, got.message) == (422, errors.TOO_DEEP)
    assert answer(raised_in("api.services.predictions", RecursionError())) is None

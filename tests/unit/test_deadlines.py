"""Deadline values as the dialects give them (core/deadlines.py): Replicate's `Cancel-After` durations, fal's
`X-Fal-Request-Timeout` seconds, both bounded; and a lease that stops at its row's deadline (worker/leases.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from core import deadlines
from worker.leases import Lease


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("500ms", 0.5),
        ("2m30s", 150),
        ("45", 45),
        ("24h", 86400),
    ],
)
def test_cancel_after_durations(text: str, seconds: float) -> None:
    assert deadlines.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5s", "0s", "25h", "5x", "1h-3m", "s", "1 h", "50ms", "nan", "inf"])
def test_cancel_after_refuses_what_is_no_duration_or_out_of_bounds(text: str) -> None:
    with pytest.raises(ValueError, match="a duration like 30s"):
        deadlines.parse_duration(text)


@pytest.mark.parametrize(("text", "seconds"), [("1", 1.0), ("0.1", 0.1), (" 2.5 ", 2.5), ("86400", 86400.0)])
def test_fal_request_timeouts(text: str, seconds: float) -> None:
    assert deadlines.parse_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1", "0", "0.05", "86401", "1e9", "nan", "inf", "1s"])
def test_fal_request_timeout_refuses_what_is_no_number_or_out_of_bounds(text: str) -> None:
    with pytest.raises(ValueError):
        deadlines.parse_seconds(text)


def test_a_time_to_start_deadline_sets_no_finish() -> None:
    assert deadlines.Deadline(2.0).columns() == ("2.0", "2.0")
    assert deadlines.Deadline(2.0, running=False).columns() == ("2.0", None)


def test_a_lease_stops_at_its_rows_deadline_by_the_databases_clock_not_this_machines() -> None:
    started = datetime(2026, 1, 1, tzinfo=UTC)  # far from this machine's clock: only the difference counts
    lease = Lease("p", time_limit_s=600)
    lease.keep_deadline({"started_at": started, "deadline_at": started + timedelta(seconds=0.2)})
    assert lease.stop_reason() is None
    while time.monotonic() < lease.deadline:
        assert lease.stop_reason() is None
        time.sleep(0.01)
    assert lease.stop_reason() == deadlines.DEADLINE_EXCEEDED
    unbounded = Lease("q", time_limit_s=600)
    unbounded.keep_deadline({"started_at": started, "deadline_at": None})
    assert unbounded.stop_reason() is None

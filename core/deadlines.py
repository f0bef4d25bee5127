"""Deadlines (docs/reliability.md, "Deadlines"): a prediction not started by its deadline ends `canceled` with
the reason DEADLINE_EXCEEDED, never runs and is never billed; one still running at its deadline is canceled at
the next denoising step, unbilled too.

A prediction has up to two moments (core/tables.py): `start_deadline_at`, by when a worker must have claimed it
(the claim refuses it after that: core/lifecycle.py; the worker whose claim was refused, the sweeper and the
API's read of its status cancel it), and `deadline_at`, by when it must have finished (the worker checks it
between steps: worker/leases.py). Replicate's `Cancel-After` and our `deadline_s` set both to the same moment;
fal's `X-Fal-Request-Timeout` is a time-to-start deadline (fal: "once a runner successfully begins processing,
the timeout stops"), so it sets only the first. Both are the database's clock: submit time plus the duration.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DEADLINE_EXCEEDED = "deadline exceeded"
MIN_S = 0.1  # fal's documented minimum for X-Fal-Request-Timeout ("> 0.1 seconds")
MAX_S = 86_400.0  # a day: longer is no deadline but a typo, and keeps the timestamp arithmetic far from overflow

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


@dataclass(frozen=True)
class Deadline:
    """A request's deadline: `seconds` from submit; `running`: also cancels it while it runs (else time-to-start
    only)."""

    seconds: float
    running: bool = True

    def columns(self) -> tuple[str, str | None]:
        """(start within, finish within) in seconds, as text, for the insert (api/infra/rows.py)."""
        seconds = repr(self.seconds)
        return seconds, seconds if self.running else None


def bounded(seconds: float) -> float:
    """`seconds` if it is a usable deadline, else ValueError saying what is allowed."""
    if not math.isfinite(seconds) or not MIN_S <= seconds <= MAX_S:
        raise ValueError(f"must be between {MIN_S:g} and {MAX_S:g} seconds")
    return seconds


def parse_duration(text: str) -> float:
    """Replicate's `Cancel-After`: a duration such as `30s`, `5m`, `1h30m`, `1.5h` or `500ms` (units ms, s, m,
    h), or a bare number of seconds; in seconds, bounded. ValueError says what is wrong."""
    value = text.strip()
    try:
        return bounded(float(value)) if re.fullmatch(r"\d+(?:\.\d+)?", value) else bounded(_units(value))
    except ValueError as exc:
        raise ValueError(f"{exc}; a duration like 30s, 5m or 1h30m, at most 24h") from None


def _units(value: str) -> float:
    if not _DURATION.fullmatch(value):
        raise ValueError(f"{value!r} is not a duration")
    return sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(value))


def parse_seconds(text: str) -> float:
    """fal's `X-Fal-Request-Timeout`: a number of seconds, bounded. ValueError says what is wrong."""
    try:
        seconds = float(text.strip())
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a number of seconds") from None
    return bounded(seconds)

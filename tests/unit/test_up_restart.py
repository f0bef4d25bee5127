"""`klein up` restarts a crashed API or worker with backoff, and gives up only on repeated crashes.

Real child processes, no PostgreSQL, Redis or S3.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ops.embedded import Service
from ops.up import RestartPolicy, supervise

FAST = RestartPolicy(max_crashes=3, window_s=10, backoff_base_s=0.1, backoff_cap_s=0.4, poll_s=0.05)


def python(tmp_path: Path, name: str, code: str) -> Service:
    return Service([sys.executable, "-c", code], dict(os.environ), tmp_path / f"{name}.log")


def after(seconds: float) -> Callable[[], bool]:
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() >= deadline


@pytest.fixture
def started() -> Iterator[list[Service]]:
    services: list[Service] = []
    yield services
    for service in services:
        service.stop(timeout=2)


def test_a_crash_is_restarted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture, started: list[Service]):
    caplog.set_level(logging.INFO, logger="klein.up")
    marker = tmp_path / "crashed-once"
    # The first run crashes with code 1; the second one stays up.
    flaky = python(
        tmp_path,
        "worker",
        f"import pathlib, sys, time\nm = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n    m.touch(); print('run 1', flush=True); sys.exit(1)\n"
        "print('run 2', flush=True); time.sleep(60)",
    )
    steady = python(tmp_path, "API", "import time; time.sleep(60)")
    started.extend([flaky.start(), steady.start()])
    first, steady_pid = flaky.process, steady.process and steady.process.pid

    assert supervise({"API": steady, "worker": flaky}, after(2.0), FAST) is None  # asked to stop: no failure

    assert flaky.alive() and flaky.process is not first, "the crashed worker was not restarted"
    assert steady.alive() and steady.process and steady.process.pid == steady_pid, "the healthy API was touched"
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("worker exited with code 1; restarting in 0.1 s (crash 1 of 3 in the last 10 s)") for m in messages
    ), messages
    assert any(m.startswith("worker restarted") for m in messages), messages
    assert not any("API" in m for m in messages), messages
    assert flaky.log.read_text().split() == ["run", "1", "run", "2"]  # the restart appends to the same log


def test_repeated_crashes_stop_everything_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, started: list[Service]
):
    caplog.set_level(logging.INFO, logger="klein.up")
    broken = python(tmp_path, "worker", "import sys; sys.exit(3)")
    steady = python(tmp_path, "API", "import time; time.sleep(60)")
    started.extend([broken.start(), steady.start()])

    began = time.monotonic()
    reason = supervise({"API": steady, "worker": broken}, after(10.0), FAST)

    assert reason is not None and reason.startswith("worker crashed 3 times within 10 s (last exit code 3)"), reason
    assert str(broken.log) in reason
    assert time.monotonic() - began < 5  # gave up on the third crash, not at the deadline
    messages = [r.getMessage() for r in caplog.records if r.name == "klein.up"]
    delays = [m.split(" (")[0] for m in messages if m.startswith("worker exited")]
    assert delays == [f"worker exited with code 3; restarting in {d} s" for d in ("0.1", "0.2")]  # exponential
    assert reason in messages


def test_crashes_spread_out_beyond_the_window_never_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, started: list[Service]
):
    caplog.set_level(logging.INFO, logger="klein.up")
    # Lives 0.6 s each time: no two crashes fall within the 0.3 s window.
    shaky = python(tmp_path, "API", "import sys, time; time.sleep(0.6); sys.exit(2)")
    started.append(shaky.start())
    policy = RestartPolicy(max_crashes=2, window_s=0.3, backoff_base_s=0.05, backoff_cap_s=0.05, poll_s=0.05)

    assert supervise({"API": shaky}, after(2.5), policy) is None

    restarts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("API restarted")]
    assert len(restarts) >= 2, restarts

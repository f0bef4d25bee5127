"""`klein up`'s terminal: its own few lines (each step and its time, the banner) on the terminal; everything else
the process writes — libraries' logs, warnings, progress bars, C-level output of embedded PostgreSQL and torch —
goes to a log file it names, whose last lines are shown when a step fails."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

_log = logging.getLogger("klein.console")  # the terminal's lines, copied into the log file


class Console:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.terminal: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 1)  # fd-level, so output that never passes through Python is caught as well
        os.dup2(log_fd, 2)
        os.close(log_fd)
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
        )  # to stderr, now the log file
        logging.captureWarnings(True)
        # Supervision's warnings (a crash, a restart) reach the terminal as well as the log.
        alerts = logging.StreamHandler(self.terminal)
        alerts.setLevel(logging.WARNING)
        alerts.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("klein.up").addHandler(alerts)

    def say(self, text: str) -> None:
        """A line for the person at the terminal, and in the log (never a secret: see `private`)."""
        self.terminal.write(text + "\n")
        _log.info("%s", text)

    def private(self, text: str) -> None:
        """A line for the terminal only (keys), kept out of the log file."""
        self.terminal.write(text + "\n")

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """`what … 2.1 s` on one line; on failure the log's last lines and where the whole log is."""
        self.terminal.write(f"{what} … ")
        _log.info("%s …", what)
        started = time.monotonic()
        try:
            yield
        except BaseException as error:
            self.terminal.write("failed\n")
            _log.exception("%s failed", what)
            if not isinstance(error, KeyboardInterrupt):
                self.terminal.write(f"{error}\n\nlast lines of {self.log_path}:\n{self.tail()}\n")
            raise
        took = f"{time.monotonic() - started:.1f} s"
        self.terminal.write(took + "\n")
        _log.info("%s done in %s", what, took)

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

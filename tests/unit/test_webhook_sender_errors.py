"""The webhook sender's own faults are counted (`klein_webhook_sender_errors_total`, KleinWebhookSenderFailing):
a poll that raises, here because its database is down, leaves the poller running and the count moving."""

from __future__ import annotations

import threading
import time
from typing import NoReturn

from prometheus_client import REGISTRY

from core.settings import Settings


class DatabaseDown:
    def begin(self) -> NoReturn:
        raise OSError("connection refused")


def test_a_poll_that_raises_is_counted_and_the_poller_goes_on() -> None:
    from worker import webhooks

    labels = {"stage": "poll"}
    before = REGISTRY.get_sample_value("klein_webhook_sender_errors_total", labels)
    assert before is not None, "the series exists before the first error"
    poller = webhooks.Poller(Settings(webhook_poll_interval_s=0.01), DatabaseDown())  # type: ignore[arg-type]
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while (REGISTRY.get_sample_value("klein_webhook_sender_errors_total", labels) or 0) < before + 2:
        assert time.monotonic() < deadline, "no poll errors counted"
        time.sleep(0.01)
    assert thread.is_alive()
    poller.stopping.set()
    thread.join(5)

"""The webhook worker: `celery -A worker.webhooks worker -Q <queue>.webhooks` (`klein webhooks`). CPU only.

A task names a prediction; it sends that prediction's due deliveries (core/webhooks.py), oldest first, each
claimed under a lease so that two senders never send one at once. Threads, not processes: a send waits on a
socket. A poller thread queues a task for every delivery that comes due (a retry) or whose sender died
(its lease lapsed) or whose prompt was lost; the rows are the truth, so a kill loses nothing.

Each attempt: the receiver's address is checked (core/netguard.py) after DNS and connected to as checked,
redirects are not followed, and the answer is read for at most its first bytes within the timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from celery.signals import setup_logging, worker_init, worker_ready, worker_shutting_down
from sqlalchemy import Connection, Engine, select

from api.routes.dialects.payloads import render  # the dialects' views (no torch on this side)
from core import logs, netguard, tracing, webhooks
from core.db import make_sync_engine
from core.queue import DELIVER_TASK, make_celery, webhooks_queue
from core.settings import Settings, get_settings
from core.tables import predictions
from worker import metrics

log = logging.getLogger(__name__)
USER_AGENT = "klein-serve-webhooks/1"

settings = get_settings()
app = make_celery(settings)
app.conf.update(
    task_default_queue=webhooks_queue(settings),
    worker_pool="threads",
    worker_concurrency=settings.webhook_concurrency,
    task_acks_late=False,  # the rows are the truth: a task lost with its worker is the poller's to redo
    worker_prefetch_multiplier=4,
    worker_disable_prefetch=False,
)


class Sender:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.lease_s = settings.webhook_timeout_s * 2 + 5  # a send cannot outlive it
        self.http = httpx.Client(follow_redirects=False, trust_env=False, timeout=settings.webhook_timeout_s)

    def deliver(self, prediction_id: str) -> None:
        """Send the prediction's due deliveries, in the order of their events."""
        while True:
            with self.engine.connect() as conn:
                delivery = conn.execute(webhooks.claim_next(prediction_id, self.lease_s)).mappings().first()
                if delivery is None:
                    return
                prediction = conn.execute(select(predictions).where(predictions.c.id == prediction_id)).mappings()
                row = prediction.first()
                signing = self._secrets(conn, delivery["tenant_id"], row)
            self._attempt(dict(delivery), row, signing)

    def _secrets(self, conn: Connection, tenant_id: str, row: Any) -> list[str]:
        own = row["webhook"].get("secret") if row is not None else None
        if own:
            return [own]
        signing = [secret for secret, _ in conn.execute(webhooks.active_secrets(tenant_id))]
        if not signing:  # the tenant never asked for its secret: make it now (an insert only the first time)
            conn.execute(webhooks.ensure_secret(tenant_id))
            signing = [secret for secret, _ in conn.execute(webhooks.active_secrets(tenant_id))]
        return signing

    def _attempt(self, delivery: dict[str, Any], row: Any, signing: list[str]) -> None:
        at = webhooks.now()
        status_code: int | None = None
        head, error = b"", None
        started = time.perf_counter()
        try:
            body = self._payload(delivery, row)
            status_code, head = self._post(delivery["url"], delivery["id"], at, body, signing)
        except netguard.FetchError as exc:
            error = str(exc)
        except httpx.TimeoutException:
            error = f"no answer within {self.settings.webhook_timeout_s:g} s"
        except httpx.HTTPError as exc:
            error = f"could not deliver: {type(exc).__name__}"
        latency_ms = round((time.perf_counter() - started) * 1000)
        outcome, next_at = self._outcome(delivery, status_code)
        metrics.WEBHOOK_ATTEMPTS.labels("retry" if outcome == "pending" else outcome).inc()
        metrics.WEBHOOK_SECONDS.observe(latency_ms / 1000)
        with self.engine.begin() as conn:
            conn.execute(webhooks.log_attempt(delivery["id"], at, status_code, latency_ms, head, error))
            recorded = conn.execute(webhooks.record(delivery["id"], delivery["attempts"], outcome, next_at)).first()
        if recorded is None:
            log.warning("delivery %s was taken over while being sent (lease lapsed)", delivery["id"])
        log.info(
            "webhook %s (%s of %s) attempt %d: %s in %d ms → %s",
            delivery["id"],
            delivery["event"],
            delivery["prediction_id"],
            delivery["attempts"],
            status_code or error,
            latency_ms,
            outcome,
        )

    def _outcome(self, delivery: dict[str, Any], status_code: int | None) -> tuple[str, datetime | None]:
        if status_code is not None and 200 <= status_code < 300:
            return "delivered", None
        if status_code == 410:
            return "gone", None
        now = webhooks.now()
        if now - delivery["created_at"] >= timedelta(seconds=self.settings.webhook_retry_window_s):
            return "failed", None
        return "pending", now + timedelta(seconds=webhooks.retry_delay(delivery["attempts"], self.settings))

    def _payload(self, delivery: dict[str, Any], row: Any) -> str:
        if row is None:  # the prediction is gone (its tenant was deleted meanwhile): the event as it was
            return orjson.dumps({"id": delivery["prediction_id"], "event": delivery["event"]}).decode()
        at_event = {**row, **_as_row(delivery["snapshot"])}
        webhook = row["webhook"]
        payload = render(webhook["dialect"], at_event, webhook["base_url"], self.settings)
        return orjson.dumps(payload).decode()

    def _post(self, url: str, msg_id: str, at: datetime, body: str, signing: list[str]) -> tuple[int, bytes]:
        target, port = netguard.target(url)
        assert target.host
        pinned, headers, extensions = netguard.pin(
            target, netguard.resolve(target.host, port), self.settings.fetch_allowlist
        )
        headers |= {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": webhooks.signature(signing, msg_id, at, body),
        }
        request = self.http.build_request("POST", pinned, content=body, headers=headers, extensions=extensions)
        response = self.http.send(request, stream=True)
        try:
            head = b""
            for chunk in response.iter_bytes():
                head += chunk
                if len(head) >= webhooks.RESPONSE_HEAD_BYTES:
                    break
            return response.status_code, head
        finally:
            response.close()


def _as_row(snapshot: dict[str, Any]) -> dict[str, Any]:
    """to_jsonb's row: timestamps back to datetimes in UTC, as the views take them."""
    row = dict(snapshot)
    for name in ("created_at", "started_at", "completed_at", "lease_expires_at"):
        if row.get(name) is not None:
            row[name] = datetime.fromisoformat(row[name]).astimezone(UTC)
    return row


class Poller:
    """Queues a task for each prediction with deliveries due or abandoned, every `webhook_poll_interval_s`."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.stopping = threading.Event()

    def poll(self) -> int:
        with self.engine.begin() as conn:
            prediction_ids = {row.prediction_id for row in conn.execute(webhooks.kick_due())}
        for prediction_id in prediction_ids:
            app.send_task(DELIVER_TASK, args=[prediction_id], queue=webhooks_queue(self.settings))
        return len(prediction_ids)

    def run(self) -> None:
        while not self.stopping.wait(self.settings.webhook_poll_interval_s):
            try:
                self.poll()
            except Exception:
                log.exception("webhook poll failed; trying again")


_engine = make_sync_engine(settings, pool_size=min(settings.webhook_concurrency, 20) + 1, pre_ping=True)
_sender = Sender(settings, _engine)
_poller = Poller(settings, _engine)


@worker_init.connect
def _start_tracing(**_: Any) -> None:
    tracing.configure("klein-webhooks", celery=True)  # threads: no fork after this


@setup_logging.connect
def _configure_logs(**_: Any) -> None:  # connected: Celery leaves the logging setup to us
    logs.configure(settings.log_format, settings.log_level, settings.secret_values())


@worker_ready.connect
def _start_poller(**_: Any) -> None:
    metrics.serve(settings.webhook_metrics_port)
    threading.Thread(target=_poller.run, name="webhook-poller", daemon=True).start()


@worker_shutting_down.connect
def _stop_poller(**_: Any) -> None:
    _poller.stopping.set()


@app.task(name=DELIVER_TASK)
def deliver(prediction_id: str) -> None:
    logs.clear()  # a thread of the pool runs one task after another
    logs.bind(prediction_id=prediction_id)
    _sender.deliver(prediction_id)

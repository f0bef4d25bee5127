"""The webhook worker: `celery -A worker.webhooks worker -Q <queue>.webhooks` (`klein webhooks`). CPU only.

A task names a prediction; it sends that prediction's due deliveries (core/webhooks.py), oldest first, each
claimed under a lease so that two senders never send one at once. Threads, not processes: a send waits on a
socket. A tenant has at most `webhook_tenant_concurrency` deliveries being sent at once: a claim beyond that
leaves the delivery to the poller, so one tenant's slow receivers cannot hold every thread. A poller thread
queues a task for every delivery that comes due (a retry), whose sender died (its lease lapsed), that waited
for its tenant's room, or whose prompt was lost; the rows are the truth, so a kill loses nothing.

Each attempt: the receiver's address is checked (core/netguard.py) after DNS and connected to as checked,
redirects are not followed, and the answer is read for at most its first bytes. The attempt ends by a
deadline of `webhook_timeout_s` from its claim, whatever the receiver does (a trickle of bytes included),
and its lease ends later still, so a delivery is never being sent twice.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from celery.signals import worker_init, worker_ready, worker_shutting_down
from sqlalchemy import Connection, Engine, select

from core import logs, netguard, tracing, webhooks
from core.batches import BATCH_EVENT
from core.db import make_sync_engine
from core.queue import DELIVER_TASK, make_celery, webhooks_queue
from core.settings import Settings, get_settings
from core.tables import predictions
from views import render  # each dialect's prediction shape (no HTTP tier, no torch)
from worker import celery_logs, exposition, webhook_metrics

log = logging.getLogger(__name__)
USER_AGENT = "klein-serve-webhooks/1"
LEASE_MARGIN_S = 5.0  # a claim's lease outlives its attempt's deadline by this: time to record the outcome

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


class Deadline:
    """The moment an attempt must be over. httpx's timeouts bound each socket operation, not their sum, so a
    receiver sending a byte now and then would hold the attempt forever: at the deadline a watchdog shuts
    the attempt's connection (its socket, learnt from httpcore's `trace` extension), which ends any read or
    write in progress."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._passed = False
        self._watchdog: threading.Timer | None = None

    def __enter__(self) -> Deadline:
        self._watchdog = threading.Timer(max(self.left(), 0.0), self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    @property
    def passed(self) -> bool:
        return self._passed or time.monotonic() >= self.at

    def left(self) -> float:
        return self.at - time.monotonic()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace callback: notes the socket of each connection made (and its TLS layer)."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            sock = info["return_value"].get_extra_info("socket")
            with self._lock:
                self._sockets.append(sock)
                if self._passed:
                    _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self._passed = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed already, or detached by its TLS layer (which is shut instead)
        sock.shutdown(socket.SHUT_RDWR)  # a blocked recv or send in the sender's thread returns at once


class Sender:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
        # No connection outlives its attempt (each is made to the address checked for it, and the deadline
        # shuts the one it made); timeouts are each attempt's, from what its deadline leaves.
        self.http = httpx.Client(
            follow_redirects=False, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)
        )

    def deliver(self, prediction_id: str) -> None:
        """Send the prediction's due deliveries, in the order of their events."""
        while True:
            deadline = Deadline(self.settings.webhook_timeout_s)  # from before the claim: its lease ends later
            with self.engine.begin() as conn:
                delivery = self._claim(conn, prediction_id)
                if delivery is None:
                    return
                prediction = conn.execute(select(predictions).where(predictions.c.id == prediction_id)).mappings()
                row = prediction.first()
                signing = self._secrets(conn, delivery["tenant_id"], row)
            with deadline:
                self._attempt(dict(delivery), row, signing, deadline)

    def _claim(self, conn: Connection, prediction_id: str) -> Any:
        """The prediction's next due delivery, now `sending`; None if nothing is due, or if its tenant has
        as many being sent as it may (then the poller queues it again once the tenant has room)."""
        tenant_id = conn.execute(webhooks.lock_tenant_of(prediction_id)).scalar()
        if tenant_id is None:
            return None
        if conn.execute(webhooks.sending_count(tenant_id)).scalar_one() >= self.settings.webhook_tenant_concurrency:
            conn.execute(webhooks.defer(prediction_id))
            return None
        return conn.execute(webhooks.claim_next(prediction_id, self.lease_s)).mappings().first()

    def _secrets(self, conn: Connection, tenant_id: str, row: Any) -> list[str]:
        own = (row["webhook"] or {}).get("secret") if row is not None else None
        if own:
            return [own]
        signing = [secret for secret, _ in conn.execute(webhooks.active_secrets(tenant_id))]
        if not signing:  # the tenant never asked for its secret: make it now (an insert only the first time)
            conn.execute(webhooks.ensure_secret(tenant_id))
            signing = [secret for secret, _ in conn.execute(webhooks.active_secrets(tenant_id))]
        return signing

    def _attempt(self, delivery: dict[str, Any], row: Any, signing: list[str], deadline: Deadline) -> None:
        at = webhooks.now()
        request_id = (row["webhook"] or {}).get("request_id") if row is not None else None
        if request_id:  # the submit's: the attempt's lines carry it, as the receiver's X-Request-ID does
            logs.bind(request_id=request_id)
        status_code: int | None = None
        head, error = b"", None
        started = time.perf_counter()
        try:
            body = self._payload(delivery, row)
            # A batch's completion rides on its first prediction, whose own row has no webhook (docs/batch.md).
            extra = webhooks.provider_headers(row["webhook"] or {}, body) if row is not None else {}
            status_code, head = self._post(
                delivery["url"], delivery["id"], at, body, signing, deadline, request_id, extra
            )
        except netguard.FetchError as exc:
            error = str(exc)
        except httpx.HTTPError as exc:
            late = deadline.passed or isinstance(exc, httpx.TimeoutException)
            error = f"no answer within {deadline.seconds:g} s" if late else f"could not deliver: {type(exc).__name__}"
        latency_ms = round((time.perf_counter() - started) * 1000)
        outcome, next_at = self._outcome(delivery, status_code)
        webhook_metrics.WEBHOOK_ATTEMPTS.labels("retry" if outcome == "pending" else outcome).inc()
        webhook_metrics.WEBHOOK_SECONDS.observe(latency_ms / 1000)
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
        if delivery["event"] == BATCH_EVENT:  # a native batch's end (core/batches.py): the batch, as it ended
            return orjson.dumps(delivery["snapshot"]).decode()
        if row is None:  # the prediction is gone (its tenant was deleted meanwhile): the event as it was
            return orjson.dumps({"id": delivery["prediction_id"], "event": delivery["event"]}).decode()
        at_event = {**row, **_as_row(delivery["snapshot"])}
        webhook = row["webhook"]
        payload = render(webhook["dialect"], at_event, webhook["base_url"], self.settings)
        return orjson.dumps(payload).decode()

    def _post(
        self,
        url: str,
        msg_id: str,
        at: datetime,
        body: str,
        signing: list[str],
        deadline: Deadline,
        request_id: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """The answer's status and first bytes. Once the status has come, the deadline cuts only the log's
        copy of the answer short: the receiver has taken the event."""
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
            **({"x-request-id": request_id} if request_id else {}),
            **(extra or {}),
        }
        if deadline.left() <= 0:  # DNS (or the claim) took it all: no connection after the deadline
            raise httpx.ConnectTimeout("the attempt's deadline passed before connecting")
        request = self.http.build_request(
            "POST",
            pinned,
            content=body,
            headers=headers,
            extensions=extensions | {"trace": deadline.trace},
            timeout=deadline.left(),
        )
        response = self.http.send(request, stream=True)
        head = b""
        try:
            for chunk in response.iter_bytes():
                head += chunk
                if len(head) >= webhooks.RESPONSE_HEAD_BYTES:
                    break
        except httpx.HTTPError:
            if not deadline.passed:
                raise
        finally:
            response.close()
        return response.status_code, head


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
            due = webhooks.kick_due(self.settings.webhook_tenant_concurrency)
            prediction_ids = {row.prediction_id for row in conn.execute(due)}
        for prediction_id in prediction_ids:
            app.send_task(DELIVER_TASK, args=[prediction_id], queue=webhooks_queue(self.settings))
        return len(prediction_ids)

    def run(self) -> None:
        while not self.stopping.wait(self.settings.webhook_poll_interval_s):
            try:
                self.poll()
            except Exception:
                webhook_metrics.WEBHOOK_SENDER_ERRORS.labels("poll").inc()
                log.exception("webhook poll failed; trying again")


_engine = make_sync_engine(settings, pool_size=min(settings.webhook_concurrency, 20) + 1, pre_ping=True)
_sender = Sender(settings, _engine)
_poller = Poller(settings, _engine)


@worker_init.connect
def _start_tracing_and_metrics(**_: Any) -> None:
    tracing.configure("klein-webhooks", celery=True)  # threads: no fork after this
    # Before the worker starts: a port already taken ends the process here, before it takes any task.
    exposition.serve(settings.webhook_metrics_port, "KLEIN_WEBHOOK_METRICS_PORT", settings.worker_metrics_host)
    webhook_metrics.identify()


celery_logs.install(settings)


@worker_ready.connect
def _start_poller(**_: Any) -> None:
    threading.Thread(target=_poller.run, name="webhook-poller", daemon=True).start()


@worker_shutting_down.connect
def _stop_poller(**_: Any) -> None:
    _poller.stopping.set()


@app.task(name=DELIVER_TASK)
def deliver(prediction_id: str) -> None:
    logs.clear()  # a thread of the pool runs one task after another
    logs.bind(prediction_id=prediction_id)
    try:
        _sender.deliver(prediction_id)
    except Exception:  # the poller queues its deliveries again (the rows are the truth)
        webhook_metrics.WEBHOOK_SENDER_ERRORS.labels("deliver").inc()
        raise

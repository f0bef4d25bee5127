"""What one worker process holds (pipeline, database, storage, events, its threads) and what it does with a
prediction: claim it (with the batch it heads, worker/batch.py), run it (worker/generation.py) under a lease
(worker/leases.py), finish and bill it, then give back the tenant's slot and announce it."""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import redis
import structlog
from sqlalchemy import BindParameter, Engine, Executable, bindparam, select

from core import (
    batches,
    events,
    lifecycle,
    logs,
    lora,
    progress,
    quota,
    redis_connection,
    result_cache,
    safety,
    tracing,
    usage,
)
from core.db import make_sync_engine
from core.deadlines import DEADLINE_EXCEEDED
from core.queue import enqueue, kick_webhooks, queued_key
from core.settings import Settings
from core.storage import ensure_bucket, make_s3_client
from core.sweeper import Sweeper, run_forever
from core.tables import predictions
from models.klein import loaded_by
from models.klein_pipeline import KleinPipeline, Stop
from worker import metrics, sweep_metrics
from worker.batch import Batcher, Item, ms
from worker.database import DB_ERRORS, Database, first, scalar
from worker.enhance import Enhancements, backend
from worker.generation import Generator, failure_reason, readable
from worker.leases import Heartbeat
from worker.loras import LoraCache
from worker.report import Report
from worker.safety import Checker

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
finished_log = structlog.get_logger("klein.prediction")


@dataclass
class WorkerRuntime:
    """One worker process: its clients, pipeline and threads (sweeper, heartbeat), started once (`start`), and
    the task's work on each prediction (`run`)."""

    settings: Settings
    pipeline: KleinPipeline
    engine: Engine  # results, billing, the sweeper: every commit durable
    leases: Engine  # the claim and its renewals, committed without waiting for the disk (Database.run)
    s3: S3Client
    redis: redis.Redis
    worker_id: str
    loras: LoraCache
    node: str = ""  # the Celery node name
    checker: Checker | None = None  # the image checker (worker/safety.py); None: none configured
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.db = Database(self.engine, self.leases, self.settings.db_retry_s)
        # The task's statements, built once and compiled once (SQLAlchemy caches them); values bound per run
        # (bound names may not be column names in an UPDATE), JSON ones as JSONB by their columns' types.
        s, wid, price = self.settings, self.worker_id, self.settings.default_price_per_image
        self.claim = lifecycle.claim(bindparam("prediction_id"), wid, s.lease_s, s.max_attempts)
        self.batcher = Batcher(s, self.db, wid)
        self.state_now = select(predictions.c.status, predictions.c.attempts).where(
            predictions.c.id == bindparam("prediction_id")
        )
        timings: BindParameter[Any] = bindparam("final_timings")
        logs: BindParameter[Any] = bindparam("final_logs")
        checked: BindParameter[Any] = bindparam("final_safety")
        outputs: BindParameter[Any] = bindparam("final_outputs")
        error: BindParameter[Any] = bindparam("final_error")
        completed = lifecycle.complete(bindparam("prediction_id"), wid, outputs, timings, logs, checked)
        failed = lifecycle.fail(bindparam("prediction_id"), wid, error, timings, logs, checked)
        self.complete = usage.finish_and_bill(completed, price, s.default_batch_price_per_image)
        self.fail = usage.finish_and_bill(failed, price, s.default_batch_price_per_image)
        self.cancel_at_deadline = lifecycle.cancel_running(bindparam("prediction_id"), wid, timings, logs)  # unbilled
        self.generator = Generator(s, self.pipeline, self.loras, self.s3, self.checker)
        self.heartbeat = Heartbeat(s, self.redis, wid, self.db.lease_autocommit, self.stopping, self.node)
        self.enhancements = Enhancements(s, self.db, self.redis, wid, backend(s, self.pipeline))  # docs/enhancer.md

    @classmethod
    def start(cls, settings: Settings, node: str = "") -> WorkerRuntime:
        started = time.perf_counter()
        worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        metrics.identify(worker_id, settings.model_id)
        s3 = make_s3_client(settings)
        ensure_bucket(s3, settings.s3_bucket)
        metrics.PIPELINE_STATE.state("loading")
        pipeline = KleinPipeline(
            settings.model_path, settings.device, settings, on_warm_up=lambda: metrics.PIPELINE_STATE.state("warming")
        )
        metrics.MODEL_LOAD_SECONDS.set(pipeline.startup.load_s)
        metrics.MODEL_WARMUP_SECONDS.set(pipeline.startup.warmup_s)
        metrics.PIPELINE_STATE.state("ready")
        checker = Checker.from_settings(settings, pipeline.device)  # after the pipeline: the same device
        client = redis_connection.sync_client(settings)  # TLS, ACL user, Sentinel; commands not retried
        # What checker this model's workers run, for GET /v1/models (the last worker to start says it).
        status = (checker.name, checker.labels, checker.threshold) if checker else (None, [], settings.safety_threshold)
        client.set(safety.status_key(settings.queue_name, settings.model_id), safety.checker_status(*status))
        # What a LoRA of this model may name, for the API's checks at submit (api/services/loras.py).
        client.set(lora.targets_key(settings.queue_name, settings.model_id), orjson.dumps(pipeline.lora_targets))
        # Which weights it serves, for the API's result cache keys (core/result_cache.py; empty: unknown, no cache).
        client.set(
            result_cache.weights_key(settings.queue_name, settings.model_id), _weights_identity(settings, pipeline)
        )
        runtime = cls(
            settings=settings,
            pipeline=pipeline,
            # No ping per checkout: Database.run retries a dead connection's failure anyway. Task and sweeper
            # here, task and heartbeat in leases.
            engine=make_sync_engine(settings, pool_size=2, pre_ping=False),
            leases=make_sync_engine(settings, pool_size=2, pre_ping=False, durable=False),
            s3=s3,
            redis=client,
            worker_id=worker_id,
            loras=LoraCache(settings, s3, pipeline.lora_targets, pipeline.prepare_lora),
            node=node,
            checker=checker,
        )
        sweeper = Sweeper(settings, runtime.engine, runtime.redis, runtime.s3)  # s3: the retention reaper
        sweeping = (sweeper, runtime.stopping, sweep_metrics.observe)
        threading.Thread(target=run_forever, args=sweeping, name="sweeper", daemon=True).start()
        log.info("worker %s ready in %.2f s", runtime.worker_id, time.perf_counter() - started)
        return runtime

    def run(self, prediction_id: str) -> None:
        """Run the prediction (`_run`); then, while LoRAs are loaded, up to `lora_affinity_streak` queued
        predictions of the same tenant wanting the same ones (lifecycle.next_with_loras): loading them again
        elsewhere costs more than the wait it saves. Their own Celery messages find them claimed. Never another
        tenant's: its note would tell that someone just ran those LoRAs (and its copies are not these)."""
        self._run(prediction_id)
        for _ in range(self.settings.lora_affinity_streak):
            loaded = self.pipeline.adapters.loaded
            if not loaded:
                return
            owners = [loaded_by(name) for name in loaded]  # one tenant's: a batch shares its LoRAs' refs
            shas = [sha256 for _, sha256 in owners]
            look = lifecycle.next_with_loras(self.settings.model_id, owners[0][0], shas, self.settings.max_attempts)
            try:
                following = self.db.run(functools.partial(scalar, statement=look), durable=False)
            except DB_ERRORS:
                return
            if following is None:
                return
            logs.unbind("request_id")  # another submit's prediction, whose request id its own message carries
            self._run(following, ahead=True)

    def _run(self, prediction_id: str, ahead: bool = False) -> None:
        """Claim, generate, encode, upload, finish. Safe to call any number of times for the same id.

        With micro-batching on (`batch_size` > 1), the claim takes along queued predictions that can share
        its pipeline call (Batcher.companions); each is then finished, billed and failed on its own, and the
        Celery messages of those taken along find them claimed and do nothing."""
        claimed_at = time.perf_counter()
        try:
            with tracing.span("claim", prediction_id=prediction_id):
                row = self.db.run(
                    lambda conn: first(conn, self.claim, {"prediction_id": prediction_id}),
                    durable=False,
                )
        except DB_ERRORS:
            log.error("database unreachable; leaving %s to the sweeper", prediction_id)
            self.redis.srem(queued_key(self.settings), prediction_id)  # not in the broker any more: sweepable
            return
        if row is None:
            if self._cancel_if_expired(prediction_id):
                return
            log.info("prediction %s is finished or held by a live worker; skipping", prediction_id)
            self.redis.srem(queued_key(self.settings), prediction_id)
            return
        logs.bind(prediction_id=prediction_id, tenant_id=row["tenant_id"])
        batch = [self._item(row)]
        batch += [self._item(companion) for companion in self.batcher.companions(row)]
        for item in batch:
            item.report.claimed(self.worker_id, item.row["attempts"], has_webhook=item.row["webhook"] is not None)
        if ahead:  # say why it ran before its turn
            batch[0].report.note("taken ahead of the queue by a worker with its LoRAs loaded")
        if len(batch) > 1:
            log.info("batched: one pipeline call for %d predictions", len(batch))
            for item in batch:  # a tenant hears of its own predictions only, never of other tenants' activity
                own = sum(other.row["tenant_id"] == item.row["tenant_id"] for other in batch)
                if own > 1:
                    item.report.note(f"batched: one pipeline call for {own} of your predictions")
            metrics.BATCH_PREDICTIONS.observe(len(batch))
        with self.heartbeat.hold([item.row["id"] for item in batch]) as leases:
            for lease, item in zip(leases, batch, strict=True):
                lease.keep_deadline(item.row)
            self.enhancements.for_batch(batch, leases)  # the rewrites of those that ask for enhance_prompt
            self.generator.generate(batch, leases)
        for index, item in enumerate(batch):
            self._finish(item, claimed_at, head=index == 0)

    def _cancel_if_expired(self, prediction_id: str) -> bool:
        """After a refused claim: if the prediction's start deadline passed while it was queued, cancel it
        (core/deadlines.py): it never runs and is never billed. False when that was not why."""
        try:
            expired = self.db.run(lambda conn: first(conn, lifecycle.expire_unstarted(prediction_id), {}))
        except DB_ERRORS:
            return False
        if expired is None:
            return False
        log.info("prediction %s canceled: %s before a worker started it", prediction_id, DEADLINE_EXCEEDED)
        metrics.PREDICTIONS.labels("canceled", "deadline").inc()
        has_webhook = expired.pop("webhook") is not None  # never published: it may hold the client's secret
        self._release_and_announce(prediction_id, expired, has_webhook)
        return True

    def _item(self, row: dict[str, Any]) -> Item:
        return Item(row, Report(self.redis, self.settings, row["id"], row["created_at"]))

    def _finish(self, item: Item, claimed_at: float, head: bool = True) -> None:
        """Record one prediction's result or failure, bill it, release its slot and announce it, and log its
        line (`head`: the prediction whose task claimed the batch, under whose request id the task logs)."""
        row, report, timings = item.row, item.report, item.timings
        prediction_id = row["id"]
        timings["total_ms"] = timings["queue_ms"] + ms(time.perf_counter() - claimed_at)
        values: dict[str, Any]
        finish: Executable
        if isinstance(item.error, Stop) and str(item.error) == DEADLINE_EXCEEDED:  # canceled, unbilled
            finish, values = self.cancel_at_deadline, {}
            report.note(f"canceled: {DEADLINE_EXCEEDED}")
            outcome, reason = "canceled", "deadline"
        elif item.error is not None:
            finish, values = self.fail, {"final_error": readable(item.error)}
            report.note(f"failed: {values['final_error']}")
            outcome, reason = "failed", failure_reason(item.error)
        else:
            finish, values = self.complete, {"final_outputs": item.outputs}
            report.note("completed")
            outcome, reason = "completed", ""
        values |= {"prediction_id": prediction_id, "final_timings": timings, "final_logs": report.logs}
        values["final_safety"] = item.safety
        values |= usage.charges(row["params"], len(item.outputs))
        with tracing.span("finish", prediction_id=prediction_id, failed="final_error" in values):
            finished = self.db.run(lambda conn: first(conn, finish, values))
        if finished is None:
            log.warning("prediction %s changed state while running (canceled?); result dropped", prediction_id)
            self._after_a_lost_finish(row, item.outputs)
            outcome, reason = "dropped", "canceled or taken over"
        elif outcome == "completed":
            metrics.record_run(timings, row["params"]["width"], row["params"]["height"])
            metrics.IMAGES.inc(len(item.outputs))
        metrics.PREDICTIONS.labels(outcome, reason).inc()
        self._release_and_announce(prediction_id, finished, has_webhook=row["webhook"] is not None)
        if row.get("batch_id") is not None:  # the next line of a batch to the queue, or the batch's end
            batches.tick(self.engine, self.redis, self.settings, row["batch_id"])
        _log_finished(row, timings, outcome, reason, head)

    def _after_a_lost_finish(self, row: Mapping[str, Any], outputs: list[dict[str, Any]]) -> None:
        """The finish found the prediction no longer ours. Canceled (or given up): nothing may stay stored, so
        delete what was uploaded. `created` with fewer attempts than the claim: a database crash took back the
        claim (it commits asynchronously, Database.run) while its message is gone and its id still marked queued, so the
        sweeper would leave it: queue it again. Otherwise another worker holds or finished it (a lapsed lease),
        under the same object keys: leave them."""
        prediction_id, claimed_attempts = row["id"], row["attempts"]
        current = self.db.run(lambda conn: conn.execute(self.state_now, {"prediction_id": prediction_id}).first())
        if current is None:
            return
        if current.status in (lifecycle.Status.CANCELED, lifecycle.Status.FAILED):
            self.generator.delete(outputs)
        elif current.status == lifecycle.Status.CREATED and current.attempts < claimed_attempts:
            log.warning("the claim of %s was lost (database restart?); queueing it again", prediction_id)
            enqueue(self.redis, self.settings, prediction_id, row["model"])

    def _release_and_announce(
        self, prediction_id: str, finished: Mapping[str, Any] | None, has_webhook: bool = False
    ) -> None:
        """When this worker finished the prediction, take its id out of the sweeper's queued set (here rather
        than after the claim: a round trip less on the prediction's path), give back the tenant's slot and
        publish the final row, note the run's time for queue ETAs and queue the webhooks' sending; else
        publish only that the row changed (a cancel cleared the rest; after a takeover the id marks the
        prediction's new message). One round trip. Waiters that miss the event fall back to their timeout,
        webhooks to their poller."""
        try:
            message = events.completion(prediction_id, finished)
        except TypeError:  # a value JSON cannot hold: waiters read the row instead, and the slot still goes back
            log.exception("could not encode the final row of %s", prediction_id)
            message = events.completion(prediction_id)
        pipe = self.redis.pipeline(transaction=False)
        if finished is not None:
            pipe.srem(queued_key(self.settings), prediction_id)
            pipe.eval(quota.RELEASE_SLOT_LUA, 1, quota.in_flight_key(self.settings.queue_name, finished["tenant_id"]))
            if finished["outputs"]:
                run_ms = finished["timings"]["total_ms"] - finished["timings"]["queue_ms"]
                progress.record_run(pipe, self.settings, run_ms, len(finished["outputs"]))
            if has_webhook:
                kick_webhooks(pipe, self.settings, prediction_id)
        pipe.publish(self.settings.events_channel, message)
        try:
            pipe.execute()
        except redis.RedisError:
            log.warning("could not release the slot of or announce %s", prediction_id, exc_info=True)


def _weights_identity(settings: Settings, pipeline: KleinPipeline) -> str:
    try:
        return result_cache.weights_identity(settings.model_path, str(pipeline.dtype), settings.fp8)
    except Exception:  # e.g. a hub id not in the local cache: answers are then never cached
        log.warning("could not identify the weights of %s: the result cache is off", settings.model_path, exc_info=True)
        return ""


def _log_finished(row: Mapping[str, Any], timings: dict[str, int], outcome: str, reason: str, head: bool) -> None:
    """The worker's one line per prediction: what it ran, how long each stage took, how it ended."""
    params = row["params"]
    fields = {
        "prediction_id": row["id"],
        "tenant_id": row["tenant_id"],
        **({} if head else {"request_id": None}),  # a batch companion's submit is not the task's
        "model": row["model"],
        "size": f"{params['width']}x{params['height']}",
        "steps": params["num_inference_steps"],
        "num_outputs": params["num_outputs"],
        "attempt": row["attempts"],
        **timings,
        "outcome": outcome,
        **({"reason": reason} if reason else {}),
    }
    if outcome == "failed":
        finished_log.warning(f"prediction {outcome}", **fields)
    else:
        finished_log.info(f"prediction {outcome}", **fields)

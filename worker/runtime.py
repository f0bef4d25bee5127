"""What one worker process holds (pipeline, database, storage, events) and the prediction it runs."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import redis
from botocore.exceptions import BotoCoreError, ClientError
from PIL.Image import Image
from sqlalchemy import BindParameter, Connection, Engine, Executable, bindparam, select
from sqlalchemy.exc import InterfaceError, OperationalError

from core import events, images, lifecycle, logs, lora, progress, quota, redis_connection, tracing, usage
from core.db import make_sync_engine
from core.queue import enqueue, kick_webhooks, queued_key
from core.settings import Settings
from core.storage import ensure_bucket, make_s3_client, output_key
from core.sweeper import Sweeper, run_forever
from core.tables import predictions
from models.klein import GenerationParams
from models.klein_pipeline import KleinPipeline, Stop
from worker import metrics
from worker.encode import encode
from worker.loras import LoraCache
from worker.report import Report

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
T = TypeVar("T")
DB_ERRORS = (OperationalError, InterfaceError)  # what a lost connection raises (SQLAlchemy drops it from the pool)


def first(conn: Connection, statement: Executable, values: Mapping[str, Any]) -> dict[str, Any] | None:
    """The statement's first row by column name, or None. A lost connection raises one of DB_ERRORS and is
    invalidated, so that the pool drops it."""
    row = conn.execute(statement, values).mappings().first()
    return None if row is None else dict(row)


def scalar(conn: Connection, statement: Executable) -> Any:
    return conn.execute(statement).scalar()


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class StorageUnavailable(RuntimeError):
    pass


@dataclass
class WorkerRuntime:
    settings: Settings
    pipeline: KleinPipeline
    engine: Engine  # results, billing, the sweeper: every commit durable
    leases: Engine  # the claim and its renewals, committed without waiting for the disk (_db)
    s3: S3Client
    redis: redis.Redis
    worker_id: str
    loras: LoraCache
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.lease_autocommit = self.leases.execution_options(isolation_level="AUTOCOMMIT")
        # The task's statements, built once and compiled once (SQLAlchemy caches them); values bound per run
        # (bound names may not be column names in an UPDATE), JSON ones as JSONB by their columns' types.
        s, wid, price = self.settings, self.worker_id, self.settings.default_price_per_image
        self.claim = lifecycle.claim(bindparam("prediction_id"), wid, s.lease_s, s.max_attempts)
        self.claim_companions = lifecycle.claim_companions(wid, s.lease_s, s.max_attempts)
        self.state_now = select(predictions.c.status, predictions.c.attempts).where(
            predictions.c.id == bindparam("prediction_id")
        )
        timings: BindParameter[Any] = bindparam("final_timings")
        logs: BindParameter[Any] = bindparam("final_logs")
        completed = lifecycle.complete(bindparam("prediction_id"), wid, bindparam("final_outputs"), timings, logs)
        failed = lifecycle.fail(bindparam("prediction_id"), wid, bindparam("final_error"), timings, logs)
        self.complete = usage.finish_and_bill(completed, price)
        self.fail = usage.finish_and_bill(failed, price)
        self.heartbeat = _Heartbeat(self)

    @classmethod
    def start(cls, settings: Settings) -> WorkerRuntime:
        started = time.perf_counter()
        s3 = make_s3_client(settings)
        ensure_bucket(s3, settings.s3_bucket)
        metrics.PIPELINE_STATE.state("loading")
        pipeline = KleinPipeline(
            settings.model_path, settings.device, settings, on_warm_up=lambda: metrics.PIPELINE_STATE.state("warming")
        )
        metrics.MODEL_LOAD_SECONDS.set(pipeline.startup.load_s)
        metrics.MODEL_WARMUP_SECONDS.set(pipeline.startup.warmup_s)
        metrics.PIPELINE_STATE.state("ready")
        client = redis_connection.sync_client(settings)  # TLS, ACL user, Sentinel; commands not retried
        # What a LoRA of this model may name, for the API's checks at submit (api/services/loras.py).
        client.set(lora.targets_key(settings.queue_name, settings.model_id), orjson.dumps(pipeline.lora_targets))
        runtime = cls(
            settings=settings,
            pipeline=pipeline,
            # No ping per checkout: _db retries a dead connection's failure anyway. Task and sweeper here,
            # task and heartbeat in leases.
            engine=make_sync_engine(settings, pool_size=2, pre_ping=False),
            leases=make_sync_engine(settings, pool_size=2, pre_ping=False, durable=False),
            s3=s3,
            redis=client,
            worker_id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            loras=LoraCache(settings, s3, pipeline.lora_targets, pipeline.prepare_lora),
        )
        sweeper = Sweeper(settings, runtime.engine, runtime.redis, runtime.s3)  # s3: the retention reaper
        threading.Thread(target=run_forever, args=(sweeper, runtime.stopping), name="sweeper", daemon=True).start()
        log.info("worker %s ready in %.2f s", runtime.worker_id, time.perf_counter() - started)
        return runtime

    def run(self, prediction_id: str) -> None:
        """Run the prediction (`_run`); then, while LoRAs are loaded, up to `lora_affinity_streak` queued
        predictions wanting the same ones (lifecycle.next_with_loras): loading them again elsewhere costs more
        than the wait it saves. Their own Celery messages find them claimed."""
        self._run(prediction_id)
        for _ in range(self.settings.lora_affinity_streak):
            loaded = self.pipeline.adapters.loaded
            if not loaded:
                return
            shas = [name.removeprefix("lora_") for name in loaded]
            look = lifecycle.next_with_loras(self.settings.model_id, shas, self.settings.max_attempts)
            try:
                following = self._db(functools.partial(scalar, statement=look), durable=False)
            except DB_ERRORS:
                return
            if following is None:
                return
            self._run(following, ahead=True)

    def _run(self, prediction_id: str, ahead: bool = False) -> None:
        """Claim, generate, encode, upload, finish. Safe to call any number of times for the same id.

        With micro-batching on (`batch_size` > 1), the claim takes along queued predictions that can share
        its pipeline call (`_companions`); each is then finished, billed and failed on its own, and the
        Celery messages of those taken along find them claimed and do nothing."""
        claimed_at = time.perf_counter()
        try:
            with tracing.span("claim", prediction_id=prediction_id):
                row = self._db(
                    lambda conn: first(conn, self.claim, {"prediction_id": prediction_id}),
                    durable=False,
                )
        except DB_ERRORS:
            log.error("database unreachable; leaving %s to the sweeper", prediction_id)
            self.redis.srem(queued_key(self.settings), prediction_id)  # not in the broker any more: sweepable
            return
        if row is None:
            log.info("prediction %s is finished or held by a live worker; skipping", prediction_id)
            self.redis.srem(queued_key(self.settings), prediction_id)
            return
        logs.bind(prediction_id=prediction_id, tenant_id=row["tenant_id"])
        batch = [_Item(row, Report(self.redis, self.settings, row["id"], row["created_at"]))]
        batch += [_Item(r, Report(self.redis, self.settings, r["id"], r["created_at"])) for r in self._companions(row)]
        for item in batch:
            item.report.claimed(self.worker_id, item.row["attempts"], has_webhook=item.row["webhook"] is not None)
        if ahead:  # say why it ran before its turn
            batch[0].report.note("taken ahead of the queue by a worker with its LoRAs loaded")
        if len(batch) > 1:
            for item in batch:
                item.report.note(f"batched: one pipeline call for {len(batch)} predictions")
            metrics.BATCH_PREDICTIONS.observe(len(batch))
        with self.heartbeat.hold([item.row["id"] for item in batch]) as leases:
            self._generate(batch, leases)
        for item in batch:
            self._finish(item, claimed_at)

    def _companions(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Queued predictions claimed to share `row`'s pipeline call, up to `batch_size` images in all: the
        compatible ones first in the queue's order (lifecycle.batch_candidates), looked for now and once more
        after `batch_window_ms` if there is room left. A database error ends the look: the claim runs with
        what it has, and what is left stays queued."""
        settings, params = self.settings, row["params"]
        room = settings.batch_size - params["num_outputs"]
        if room <= 0 or params["reference_keys"]:
            return []
        deadline = time.monotonic() + settings.batch_window_ms / 1000
        taken: list[dict[str, Any]] = []
        while True:
            try:
                claimed = self._db(functools.partial(self._take_companions, row=row, room=room), durable=False)
            except DB_ERRORS:
                log.warning("could not look for predictions to batch with %s", row["id"], exc_info=True)
                return taken
            taken += claimed
            room -= sum(r["params"]["num_outputs"] for r in claimed)
            wait = deadline - time.monotonic()
            if room <= 0 or wait <= 0:
                return taken
            time.sleep(wait)
            deadline = 0.0  # looked again after the window: done then

    def _take_companions(self, conn: Connection, row: Mapping[str, Any], room: int) -> list[dict[str, Any]]:
        """One look: the first candidates whose images fit in `room`, claimed if still queued."""
        look = lifecycle.batch_candidates(row["model"], row["params"], row["id"], self.settings.max_attempts, room)
        ids, images = [], 0
        for candidate in conn.execute(look):
            if images + candidate.num_outputs <= room:
                ids.append(candidate.id)
                images += candidate.num_outputs
        if not ids:
            return []
        return [dict(r) for r in conn.execute(self.claim_companions, {"ids": ids}).mappings()]

    def _finish(self, item: _Item, claimed_at: float) -> None:
        """Record one prediction's result or failure, bill it, release its slot and announce it."""
        row, report, timings = item.row, item.report, item.timings
        prediction_id = row["id"]
        timings["total_ms"] = timings["queue_ms"] + _ms(time.perf_counter() - claimed_at)
        values: dict[str, Any]
        if item.error is not None:
            finish, values = self.fail, {"final_error": _readable(item.error)}
            report.note(f"failed: {values['final_error']}")
            outcome, reason = "failed", _reason(item.error)
        else:
            finish, values = self.complete, {"final_outputs": item.outputs}
            report.note("completed")
            outcome, reason = "completed", ""
        values |= {"prediction_id": prediction_id, "final_timings": timings, "final_logs": report.logs}
        values |= usage.charges(row["params"], len(item.outputs))
        with tracing.span("finish", prediction_id=prediction_id, failed="final_error" in values):
            finished = self._db(lambda conn: first(conn, finish, values))
        if finished is None:
            log.warning("prediction %s changed state while running (canceled?); result dropped", prediction_id)
            self._after_a_lost_finish(row, item.outputs)
            outcome, reason = "dropped", "canceled or taken over"
        elif outcome == "completed":
            metrics.record_run(timings, row["params"]["width"], row["params"]["height"])
        metrics.PREDICTIONS.labels(outcome, reason).inc()
        self._release_and_announce(prediction_id, finished, has_webhook=row["webhook"] is not None)

    def _after_a_lost_finish(self, row: Mapping[str, Any], outputs: list[dict[str, Any]]) -> None:
        """The finish found the prediction no longer ours. Canceled (or given up): nothing may stay stored, so
        delete what was uploaded. `created` with fewer attempts than the claim: a database crash took back the
        claim (it commits asynchronously, _db) while its message is gone and its id still marked queued, so the
        sweeper would leave it: queue it again. Otherwise another worker holds or finished it (a lapsed lease),
        under the same object keys: leave them."""
        prediction_id, claimed_attempts = row["id"], row["attempts"]
        current = self._db(lambda conn: conn.execute(self.state_now, {"prediction_id": prediction_id}).first())
        if current is None:
            return
        if current.status in (lifecycle.Status.CANCELED, lifecycle.Status.FAILED):
            self._delete(outputs)
        elif current.status == lifecycle.Status.CREATED and current.attempts < claimed_attempts:
            log.warning("the claim of %s was lost (database restart?); queueing it again", prediction_id)
            enqueue(self.redis, self.settings, prediction_id, row["model"])

    def _generate(self, batch: list[_Item], leases: list[_Lease]) -> None:
        """Run the batch's pipeline call, then encode and upload each prediction's images. Sets each item's
        outputs or error; never raises. A prediction fails alone where it can (its parameters, its stop, its
        upload); a failing pipeline call fails all of its predictions."""
        live: list[tuple[_Item, _Lease, GenerationParams]] = []
        for item, lease in zip(batch, leases, strict=True):
            try:
                live.append((item, lease, GenerationParams.model_validate(item.row["params"])))
            except ValueError as exc:
                log.exception("prediction %s has parameters this worker cannot run", item.row["id"])
                item.error = exc
        if not live:
            return
        ids = ",".join(item.row["id"] for item, _, _ in live)
        shared = live[0][2]  # what the batch shares; companions have no references (lifecycle.batch_candidates)
        keys, count = shared.reference_keys, sum(params.num_outputs for _, _, params in live)
        size = {"width": shared.width, "height": shared.height, "steps": shared.num_inference_steps}
        started = time.perf_counter()
        try:
            self._use_loras(shared, [item for item, _, _ in live])
            with tracing.span("load references", prediction_id=ids, references=len(keys)):
                references = [images.decode(self._read(key), self.settings.max_image_pixels) for key in keys]
            started = time.perf_counter()
            with tracing.span("inference", prediction_id=ids, images=count, **size):
                results = self.pipeline.generate_batch(
                    [params for _, _, params in live],
                    references,
                    _all_stopped([lease for _, lease, _ in live]),
                    [item.report.step for item, _, _ in live],
                )
        except Exception as exc:  # the predictions fail; the worker keeps serving
            log.exception("pipeline call for %s failed", ids)
            self.pipeline.release_memory()
            for item, _, _ in live:
                item.error = exc
            return
        inference_ms = _ms(time.perf_counter() - started)
        for (item, lease, params), outputs in zip(live, results, strict=True):
            item.timings["inference_ms"] = inference_ms
            reason = lease.stop_reason()  # canceled, or timed out, while the others ran on
            try:
                if reason is not None:
                    raise Stop(reason)
                item.outputs = self._store(item, params, outputs)
            except Exception as exc:
                if not isinstance(exc, Stop | StorageUnavailable):
                    log.exception("prediction %s failed", item.row["id"])
                item.error = exc

    def _use_loras(self, params: GenerationParams, batch: list[_Item]) -> None:
        """Make the prediction's LoRAs (all of a batch's are the same) the pipeline's active set; none: the base
        model exactly. The tenant's logs name each one applied; where it came from (memory, disk, storage) and how
        long it took go to the worker's log only, as they tell what other tenants ran."""
        adapters = []
        for ref in params.loras:
            loaded = self.loras.get(ref)
            adapters.append((ref.adapter_name, loaded.tensors, ref.scale))
            log.info("LoRA %s from %s in %d ms", ref.sha256[:12], loaded.source, _ms(loaded.seconds))
        seconds = self.pipeline.adapters.use(adapters)
        if adapters:
            log.info("LoRAs active after %d ms of loading into the pipeline", _ms(seconds))
        for item in batch:
            for ref in params.loras:
                item.report.note(f"LoRA {ref.sha256[:12]} (scale {ref.scale:g}) applied")

    def _store(self, item: _Item, params: GenerationParams, outputs: list[Image]) -> list[dict[str, Any]]:
        """Encode and upload one prediction's images; on an upload error nothing of it is left behind."""
        prediction_id, timings, report = item.row["id"], item.timings, item.report
        traced: dict[str, str | int] = {"prediction_id": prediction_id, "images": params.num_outputs}
        started = time.perf_counter()
        with tracing.span("encode", **traced, format=params.output_format):
            encoded = [encode(image, params.output_format, params.output_quality) for image in outputs]
        timings["encode_ms"] = _ms(time.perf_counter() - started)
        report.note(f"encoded {len(encoded)} {params.output_format} in {timings['encode_ms']} ms")

        started = time.perf_counter()
        stored: list[dict[str, Any]] = []
        try:
            with tracing.span("upload", **traced, bytes=sum(len(data) for data, _ in encoded)):
                for index, (data, content_type) in enumerate(encoded):
                    name = f"output.{params.output_format}" if index == 0 else f"output_{index}.{params.output_format}"
                    key = output_key(item.row["tenant_id"], prediction_id, name)
                    self.s3.put_object(Bucket=self.settings.s3_bucket, Key=key, Body=data, ContentType=content_type)
                    stored.append({"filename": name, "key": key, "content_type": content_type, "bytes": len(data)})
        except (BotoCoreError, ClientError) as exc:
            log.error("upload of %s failed: %s", prediction_id, exc)
            self._delete(stored)  # never leave half a result behind
            attempts = self.settings.s3_max_attempts
            raise StorageUnavailable(f"storage unavailable after {attempts} attempts ({type(exc).__name__})") from exc
        timings["upload_ms"] = _ms(time.perf_counter() - started)
        report.note(f"uploaded {sum(o['bytes'] for o in stored)} bytes in {timings['upload_ms']} ms")
        return stored

    def _read(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.settings.s3_bucket, Key=key)["Body"].read()

    def _delete(self, stored: list[dict[str, Any]]) -> None:
        for output in stored:
            try:
                self.s3.delete_object(Bucket=self.settings.s3_bucket, Key=output["key"])
            except (BotoCoreError, ClientError):
                log.warning("could not delete partial output %s", output["key"])

    def _db(self, work: Callable[[Connection], T], durable: bool = True) -> T:
        """Run `work`, one statement, retrying through database outages for up to `db_retry_s`.

        Each of the worker's statements is atomic on its own (claim, finish-and-bill, renew), so they run
        in autocommit: no BEGIN and COMMIT round trips on a prediction's path. `durable=False` (the claim)
        does not wait for the disk, a flush less on the path (docs/performance.md): a database crash can
        take back only a claim (run() then queues the prediction again), never a result, since the
        finish's durable commit flushes the claim before it."""
        deadline = time.monotonic() + self.settings.db_retry_s
        delay = 0.2
        while True:
            try:
                with (self.autocommit if durable else self.lease_autocommit).connect() as conn:
                    return work(conn)
            except DB_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("database unavailable (%s); retrying in %.1f s", type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

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


class _Heartbeat:
    """One thread for the worker's lifetime renews the lease of the prediction running now, and each
    prediction's `_Lease` says when to stop it. (A thread per prediction cost each one 0.8 ms to start.)

    Renewals come every `min(lease_s / 3, 2 s)` from the claim, often enough to keep the lease and to
    notice a cancel within about two seconds; stops are checked between denoising steps.
    """

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.every_s = min(runtime.settings.lease_s / 3, 2.0)
        self._current: list[_Lease] = []  # the leases of the batch running now
        self._changed = threading.Condition()
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()

    @contextlib.contextmanager
    def hold(self, prediction_ids: list[str]) -> Iterator[list[_Lease]]:
        leases = [_Lease(prediction_id, self.runtime.settings.task_time_limit_s) for prediction_id in prediction_ids]
        with self._changed:
            self._current = leases
            self._changed.notify()
        try:
            yield leases
        finally:
            with self._changed:
                self._current = []

    def _beat(self) -> None:
        runtime = self.runtime
        announced_at = 0.0
        while not runtime.stopping.is_set():
            if time.monotonic() - announced_at >= self.every_s:  # alive, for the queue's ETA (core/progress.py)
                announced_at = time.monotonic()
                try:
                    progress.heartbeat(runtime.redis, runtime.settings, runtime.worker_id)
                except redis.RedisError:
                    log.warning("could not announce worker %s as live", runtime.worker_id)
            with self._changed:
                leases = self._current
                if not leases:
                    self._changed.wait(self.every_s)
                    continue
                wait = leases[0].renewed_at + self.every_s - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
            # A renewal racing a prediction's finish finds it no longer processing: it changes nothing.
            renew = lifecycle.renew(
                [lease.prediction_id for lease in leases], runtime.worker_id, runtime.settings.lease_s
            )
            renewed_at = time.monotonic()
            try:
                with runtime.lease_autocommit.connect() as conn:
                    kept = set(conn.execute(renew).scalars())
            except (OperationalError, InterfaceError):
                log.warning("heartbeat of %d predictions missed (database unavailable)", len(leases))
                kept = None
            for lease in leases:
                lease.renewed_at = renewed_at
                if kept is not None:
                    lease.lost = lease.prediction_id not in kept


@dataclass
class _Lease:
    prediction_id: str
    time_limit_s: float
    started_at: float = field(default_factory=time.monotonic)
    renewed_at: float = field(default_factory=time.monotonic)  # the claim, then each renewal
    lost: bool = False  # the last renewal found the prediction no longer ours

    def stop_reason(self) -> str | None:
        if self.lost:
            return "canceled or taken over by another worker"
        if time.monotonic() - self.started_at > self.time_limit_s:
            return f"timed out after {self.time_limit_s:g} s"
        return None


@dataclass
class _Item:
    """One prediction of a batch: its claimed row, what it reports, and how it ends."""

    row: dict[str, Any]
    report: Report
    timings: dict[str, int] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.timings["queue_ms"] = _ms((self.row["started_at"] - self.row["created_at"]).total_seconds())


def _all_stopped(leases: list[_Lease]) -> Callable[[], str | None]:
    """The pipeline call's stop: when every prediction in it has a reason to stop (one that alone stops is
    dropped after the call), the first one's reason."""

    def reason() -> str | None:
        reasons = [lease.stop_reason() for lease in leases]
        return reasons[0] if all(reasons) else None

    return reason


def _reason(exc: BaseException) -> str:
    """A failure's kind, for the metrics' `reason` label (a few fixed values)."""
    if isinstance(exc, Stop):
        return "timeout" if "timed out" in str(exc) else "canceled"
    if isinstance(exc, StorageUnavailable):
        return "storage"
    if isinstance(exc, lora.LoraError):
        return "lora"
    if "out of memory" in str(exc).lower():
        return "out_of_memory"
    return "internal"


def _readable(exc: BaseException) -> str:
    """The reason a client reads: ours where we wrote one, never an exception's own text (the log has it)."""
    if isinstance(exc, Stop | StorageUnavailable | lora.LoraError):  # written for the client already
        return str(exc)
    if "out of memory" in str(exc).lower():
        return "the GPU ran out of memory for this request; try a smaller size or fewer images"
    return "the worker could not generate this image: an internal error, logged with this prediction's id"

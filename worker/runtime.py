"""What one worker process holds (pipeline, database, storage, events) and the prediction it runs."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import Engine, Update

from core import lifecycle, quota, usage
from core.db import make_sync_engine
from core.settings import Settings
from core.storage import ensure_bucket, make_s3_client, output_key
from models.klein import GenerationParams
from models.klein_pipeline import KleinPipeline
from worker.encode import encode

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass
class WorkerRuntime:
    settings: Settings
    pipeline: KleinPipeline
    engine: Engine
    s3: S3Client
    redis: redis.Redis
    worker_id: str

    def __post_init__(self) -> None:
        self.release_script = self.redis.register_script(quota.RELEASE_SLOT_LUA)

    @classmethod
    def start(cls, settings: Settings) -> WorkerRuntime:
        started = time.perf_counter()
        s3 = make_s3_client(settings)
        ensure_bucket(s3, settings.s3_bucket)
        runtime = cls(
            settings=settings,
            pipeline=KleinPipeline(settings.model_path, settings.device),
            engine=make_sync_engine(settings),
            s3=s3,
            redis=redis.Redis.from_url(settings.redis_url, socket_timeout=5),
            worker_id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        )
        log.info("worker %s ready in %.2f s", runtime.worker_id, time.perf_counter() - started)
        return runtime

    def run(self, prediction_id: str) -> None:
        """Claim, generate, encode, upload, finish. Safe to call twice for the same id."""
        claimed_at = time.perf_counter()
        row = self._execute(lifecycle.claim(prediction_id, self.worker_id, self.settings.task_time_limit_s))
        if row is None:
            log.info("prediction %s is finished or held by a live worker; skipping", prediction_id)
            return
        timings = {"queue_ms": _ms((row["started_at"] - row["created_at"]).total_seconds())}
        try:
            outputs = self._generate(prediction_id, row, timings)
        except Exception as exc:  # the prediction fails; the worker keeps serving
            log.exception("prediction %s failed", prediction_id)
            timings["total_ms"] = timings["queue_ms"] + _ms(time.perf_counter() - claimed_at)
            finish = lifecycle.fail(prediction_id, self.worker_id, _readable(exc), timings)
        else:
            timings["total_ms"] = timings["queue_ms"] + _ms(time.perf_counter() - claimed_at)
            finish = lifecycle.complete(prediction_id, self.worker_id, outputs, timings)
        if self._finish(finish) is None:
            log.warning("prediction %s changed state while running (canceled?); result dropped", prediction_id)
        else:
            self._release_slot(row["tenant_id"])
        self._announce(prediction_id)

    def _generate(self, prediction_id: str, row: Any, timings: dict[str, int]) -> list[dict[str, Any]]:
        params = GenerationParams.model_validate(row["params"])
        started = time.perf_counter()
        images = self.pipeline.generate(params)
        timings["inference_ms"] = _ms(time.perf_counter() - started)

        started = time.perf_counter()
        encoded = [encode(image, params.output_format, params.output_quality) for image in images]
        timings["encode_ms"] = _ms(time.perf_counter() - started)

        started = time.perf_counter()
        outputs = []
        for index, (data, content_type) in enumerate(encoded):
            filename = f"output.{params.output_format}" if index == 0 else f"output_{index}.{params.output_format}"
            key = output_key(row["tenant_id"], prediction_id, filename)
            self.s3.put_object(Bucket=self.settings.s3_bucket, Key=key, Body=data, ContentType=content_type)
            outputs.append({"filename": filename, "key": key, "content_type": content_type, "bytes": len(data)})
        timings["upload_ms"] = _ms(time.perf_counter() - started)
        return outputs

    def _execute(self, statement: Update) -> Any:
        with self.engine.begin() as conn:
            return conn.execute(statement).mappings().first()

    def _finish(self, statement: Update) -> Any:
        """Apply the final transition; a completion is billed in the same transaction, so exactly once."""
        with self.engine.begin() as conn:
            row = conn.execute(statement).mappings().first()
            if row is not None and row["status"] == lifecycle.Status.COMPLETED:
                conn.execute(usage.record(row, self.settings.default_price_per_image))
            return row

    def _release_slot(self, tenant_id: str) -> None:
        try:
            self.release_script(keys=[quota.in_flight_key(self.settings.queue_name, tenant_id)])
        except redis.RedisError:
            log.warning("could not release the in-flight slot of tenant %s", tenant_id, exc_info=True)

    def _announce(self, prediction_id: str) -> None:
        try:
            self.redis.publish(self.settings.events_channel, prediction_id)
        except redis.RedisError:  # waiters fall back to their timeout; the row is already final
            log.warning("could not publish completion of %s", prediction_id, exc_info=True)


def _readable(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}"[:500] if message else type(exc).__name__

"""One pipeline call for a batch: its LoRAs applied, its references loaded, the inference run, each prediction's
images encoded and uploaded (and deleted again when they may not stay). Also why a prediction failed: the
kind the metrics count (`failure_reason`) and the text its client reads (`readable`)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from PIL.Image import Image

from core import images, lora, tracing
from core import safety as core_safety
from core.enhance import EnhanceFailed
from core.settings import Settings
from core.storage import output_key
from models.klein import GenerationParams
from models.klein_pipeline import KleinPipeline, Stop
from worker import safety, safety_audit
from worker.batch import Item, ms
from worker.encode import encode
from worker.leases import Lease, all_stopped
from worker.loras import LoraCache

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)


class StorageUnavailable(RuntimeError):
    pass


class Generator:
    """Runs a batch through the worker's pipeline and stores its results."""

    def __init__(
        self,
        settings: Settings,
        pipeline: KleinPipeline,
        loras: LoraCache,
        s3: S3Client,
        checker: safety.Checker | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.loras = loras
        self.s3 = s3
        self.checker = checker

    def generate(self, batch: list[Item], leases: list[Lease]) -> None:
        """Run the batch's pipeline call, then encode and upload each prediction's images. Sets each item's
        outputs or error; never raises. A prediction fails alone where it can (its parameters, its stop, its
        upload); a failing pipeline call fails all of its predictions."""
        live: list[tuple[Item, Lease, GenerationParams]] = []
        for item, lease in zip(batch, leases, strict=True):
            if item.error is not None:  # failed before the call (its prompt enhancement: worker/enhance.py)
                continue
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
                    all_stopped([lease for _, lease, _ in live]),
                    [item.report.step for item, _, _ in live],
                )
        except Exception as exc:  # the predictions fail; the worker keeps serving
            log.exception("pipeline call for %s failed", ids)
            self.pipeline.release_memory()
            for item, _, _ in live:
                item.error = exc
            return
        inference_ms = ms(time.perf_counter() - started)
        started = time.perf_counter()
        try:  # every output of the call in one pass, before anything is encoded or stored
            with tracing.span("safety check", prediction_id=ids, images=count):
                reviews = safety.review(self.checker, [params.safety for _, _, params in live], results)
        except Exception as exc:  # fails closed: nothing unchecked is stored
            log.exception("safety check for %s failed", ids)
            for item, _, _ in live:
                item.error = exc
            return
        check_ms = ms(time.perf_counter() - started)
        for (item, lease, params), checked in zip(live, reviews, strict=True):
            item.timings["inference_ms"] = inference_ms
            if checked.record["checked"]:
                item.timings["safety_ms"] = check_ms
            item.safety = checked.record
            safety_audit.account(item, checked.record, self.settings.metrics_per_tenant)
            reason = lease.stop_reason()  # canceled, or timed out, while the others ran on
            try:
                if reason is not None:
                    raise Stop(reason)
                if checked.blocked:
                    raise safety.ContentBlocked(core_safety.BLOCKED_ERROR)
                item.outputs = self._store(item, params, checked.outputs)
            except Exception as exc:
                if not isinstance(exc, Stop | StorageUnavailable | safety.ContentBlocked):
                    log.exception("prediction %s failed", item.row["id"])
                item.error = exc

    def _use_loras(self, params: GenerationParams, batch: list[Item]) -> None:
        """Make the prediction's LoRAs (all of a batch's are the same, its tenant's copies) the pipeline's active
        set; none: the base model exactly. The tenant's logs name each one applied; where it came from (memory,
        disk, storage) and how long it took go to the worker's log only, for operators."""
        adapters = []
        for ref in params.loras:
            loaded = self.loras.get(ref)
            adapters.append((ref.adapter_name, loaded.tensors, ref.scale))
            log.info("LoRA %s from %s in %d ms", ref.sha256[:12], loaded.source, ms(loaded.seconds))
        seconds = self.pipeline.adapters.use(adapters)
        if adapters:
            log.info("LoRAs active after %d ms of loading into the pipeline", ms(seconds))
        for item in batch:
            for ref in params.loras:
                item.report.note(f"LoRA {ref.sha256[:12]} (scale {ref.scale:g}) applied")

    def _store(self, item: Item, params: GenerationParams, outputs: list[Image]) -> list[dict[str, Any]]:
        """Encode and upload one prediction's images; on an upload error nothing of it is left behind."""
        prediction_id, timings, report = item.row["id"], item.timings, item.report
        traced: dict[str, str | int] = {"prediction_id": prediction_id, "images": params.num_outputs}
        started = time.perf_counter()
        with tracing.span("encode", **traced, format=params.output_format):
            encoded = [encode(image, params.output_format, params.output_quality) for image in outputs]
        timings["encode_ms"] = ms(time.perf_counter() - started)
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
            self.delete(stored)  # never leave half a result behind
            attempts = self.settings.s3_max_attempts
            raise StorageUnavailable(f"storage unavailable after {attempts} attempts ({type(exc).__name__})") from exc
        timings["upload_ms"] = ms(time.perf_counter() - started)
        report.note(f"uploaded {sum(o['bytes'] for o in stored)} bytes in {timings['upload_ms']} ms")
        return stored

    def _read(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.settings.s3_bucket, Key=key)["Body"].read()

    def delete(self, stored: list[dict[str, Any]]) -> None:
        """Delete stored outputs, as far as storage lets us (a failure is logged)."""
        for output in stored:
            try:
                self.s3.delete_object(Bucket=self.settings.s3_bucket, Key=output["key"])
            except (BotoCoreError, ClientError):
                log.warning("could not delete partial output %s", output["key"])


def failure_reason(exc: BaseException) -> str:
    """A failure's kind, for the metrics' `reason` label (a few fixed values)."""
    if isinstance(exc, Stop):
        return "timeout" if "timed out" in str(exc) else "canceled"
    if isinstance(exc, StorageUnavailable):
        return "storage"
    if isinstance(exc, safety.ContentBlocked):
        return "content_policy"
    if isinstance(exc, lora.LoraError):
        return "lora"
    if isinstance(exc, EnhanceFailed):
        return "enhancer"
    if "out of memory" in str(exc).lower():
        return "out_of_memory"
    return "internal"


def readable(exc: BaseException) -> str:
    """The reason a client reads: ours where we wrote one, never an exception's own text (the log has it)."""
    if isinstance(exc, Stop | StorageUnavailable | lora.LoraError | safety.ContentBlocked | EnhanceFailed):  # ours
        return str(exc)
    if "out of memory" in str(exc).lower():
        return "the GPU ran out of memory for this request; try a smaller size or fewer images"
    return "the worker could not generate this image: an internal error, logged with this prediction's id"

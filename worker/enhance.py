"""Prompt enhancement on the GPU worker (docs/enhancer.md): standalone jobs (`klein.enhance`, core/enhance_jobs.py)
and the rewrite of a prediction that asks for `enhance_prompt`, run before its pipeline call under its lease.

Either way the rewrite passes the prompt policy (core/prompt_policy.py) with the tenant's terms before it is used,
is timed (`enhance_ms`) and billed at the tenant's price per enhancement. A prediction whose rewrite fails fails
with the reason, unless it asked for `"best_effort"`: then it is generated from its original prompt, and its logs
say why.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy import Connection, bindparam, select, update

from core import enhance, enhance_jobs, prompt_policy
from core.enhance import Enhanced, EnhanceFailed
from core.ids import new_id
from core.lifecycle import Status
from core.settings import Settings
from core.tables import predictions, tenants
from models.klein_pipeline import KleinPipeline, Stop
from worker.batch import Item, ms
from worker.database import DB_ERRORS, Database, first
from worker.leases import Lease

log = logging.getLogger(__name__)
Backend = Callable[[list[dict[str, str]], Callable[[], str | None]], Enhanced]
POLICY_REFUSED = "the enhanced prompt was refused by the content policy (blocked terms)"
ENHANCER_OFF = "prompt enhancement is off on this deployment (KLEIN_ENHANCER=off)"


def backend(settings: Settings, pipeline: KleinPipeline) -> Backend | None:
    """The configured enhancer, or None when it is off (or `local` on a pipeline without its whole LM)."""
    if settings.enhancer == "openai":
        return lambda conversation, _stop: enhance.openai_chat(settings, conversation)
    if settings.enhancer == "local" and pipeline.language_model is not None:
        from models.enhancer import LocalEnhancer

        local = LocalEnhancer(
            pipeline.language_model,
            pipeline.pipe.tokenizer,
            settings.enhancer_max_tokens,
            model=f"{settings.model_id} text encoder (Qwen3)",
        )
        return local.enhance
    return None


@functools.lru_cache(maxsize=4)
def _operator_terms(path: str | None) -> tuple[str, ...]:
    return prompt_policy.read_terms(path)


class Enhancements:
    """The worker's enhancer and its jobs' statements (built once, values bound per run)."""

    def __init__(
        self, settings: Settings, db: Database, client: redis.Redis, worker_id: str, run: Backend | None
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = client
        self.worker_id = worker_id
        self.backend = run
        price = settings.default_price_per_enhancement
        self.claim = enhance_jobs.claim(worker_id, settings.lease_s, settings.max_attempts)
        self.renew = enhance_jobs.renew(worker_id, settings.lease_s)
        self.complete = enhance_jobs.complete(worker_id, price)
        self.fail = enhance_jobs.fail(worker_id)
        self.terms = select(tenants.c.blocked_terms).where(tenants.c.id == bindparam("tenant_id"))
        p = predictions.c
        store = (  # only while this worker holds the prediction
            update(predictions)
            .where(p.id == bindparam("prediction_id"), p.status == Status.PROCESSING, p.worker_id == worker_id)
            .values(enhanced_prompt=bindparam("enhanced"))
            .returning(p.id, p.tenant_id, p.api_key_id, p.model, p.started_at)
        )
        self.keep = enhance_jobs.record(store, price)

    def rewrite(
        self, tenant_id: str, prompt: str, style: str | None, references: int, stop: Callable[[], str | None]
    ) -> Enhanced:
        """One rewrite, checked against the prompt policy. EnhanceFailed (or Stop) when there is none to use."""
        if self.backend is None:
            raise EnhanceFailed(ENHANCER_OFF)
        try:
            enhanced = self.backend(enhance.messages(prompt, style, references), stop)
        except (EnhanceFailed, Stop):
            raise
        except Exception as exc:  # the model itself failed: logged here, a reason for the client
            log.exception("the prompt enhancer failed")
            raise EnhanceFailed("the prompt enhancer failed: an internal error, logged with this id") from exc
        own = self.db.run(lambda conn: conn.execute(self.terms, {"tenant_id": tenant_id}).scalar())
        if prompt_policy.blocked(enhanced.prompt, _operator_terms(self.settings.prompt_blocklist) + tuple(own or ())):
            raise EnhanceFailed(POLICY_REFUSED)
        return enhanced

    # Standalone jobs -------------------------------------------------------------------------------------------

    def run(self, job_id: str) -> None:
        """Claim, rewrite, finish and bill one job; announce it to Try-Sync waiters. Safe to call again."""
        try:
            row = self.db.run(lambda conn: first(conn, self.claim, {"job_id": job_id}), durable=False)
        except DB_ERRORS:
            log.error("database unreachable; enhancement %s not run", job_id)
            return
        if row is None:
            log.info("enhancement %s is finished or held by a live worker; skipping", job_id)
            return
        queue_ms = ms((row["started_at"] - row["created_at"]).total_seconds())
        started = time.perf_counter()
        job_input = row["input"]
        values: dict[str, Any] = {"job_id": job_id}
        try:
            enhanced = self.rewrite(
                row["tenant_id"],
                job_input["prompt"],
                job_input.get("style"),
                int(job_input.get("references", 0)),
                self._stop(job_id),
            )
        except (EnhanceFailed, Stop) as exc:
            finish = self.fail
            values |= {"final_error": str(exc), "final_timings": {"queue_ms": queue_ms}}
        else:
            finish = self.complete
            values |= {
                "final_output": enhanced.prompt,
                "final_enhancer": enhanced.model,
                "final_tokens": enhanced.new_tokens,
                "final_timings": {"queue_ms": queue_ms, **enhanced.timings},
            }
        values["final_timings"]["total_ms"] = queue_ms + ms(time.perf_counter() - started)
        finished = self.db.run(lambda conn: first(conn, finish, values))
        if finished is None:
            log.info("enhancement %s changed state while running (canceled?); result dropped", job_id)
        try:
            self.redis.publish(self.settings.events_channel, job_id)
        except redis.RedisError:
            log.warning("could not announce enhancement %s", job_id)

    def _stop(self, job_id: str) -> Callable[[], str | None]:
        """The job's reason to stop, asked after every token: its time limit, or a renewal that finds it no longer
        ours (canceled). Renews the lease every min(lease_s / 3, 2 s)."""
        limit = self.settings.enhancer_timeout_s
        deadline = time.monotonic() + limit
        every = min(self.settings.lease_s / 3, 2.0)
        renewed = [time.monotonic()]

        def reason() -> str | None:
            now = time.monotonic()
            if now > deadline:
                return f"timed out after {limit:g} s"
            if now - renewed[0] >= every:
                renewed[0] = now
                try:
                    kept = self.db.run(lambda conn: conn.execute(self.renew, {"job_id": job_id}).first(), durable=False)
                except DB_ERRORS:
                    return None  # the next renewal tries again; the lease outlasts a few misses
                if kept is None:
                    return "canceled"
            return None

        return reason

    # A prediction's rewrite --------------------------------------------------------------------------------------

    def for_batch(self, batch: list[Item], leases: list[Lease]) -> None:
        """Rewrite the prompt of each prediction of the batch that asks for it, before the pipeline call: its
        params then carry the rewrite, stored as its `enhanced_prompt` and billed. A prediction retried after its
        rewrite was stored keeps that one (the same seed and rewrite give the same image)."""
        for item, lease in zip(batch, leases, strict=True):
            params = item.row["params"]
            asked = params.get("enhance", "off")
            if asked == "off":
                continue
            if item.row.get("enhanced_prompt"):
                item.row["params"] = params | {"prompt": item.row["enhanced_prompt"]}
                item.report.note("prompt enhanced by an earlier attempt; generating from that rewrite")
                continue
            try:
                references = len(params.get("reference_keys") or ())
                enhanced = self.rewrite(item.row["tenant_id"], params["prompt"], None, references, self._within(lease))
                self.db.run(functools.partial(self._keep, item=item, enhanced=enhanced))
            except Stop as exc:
                if lease.stop_reason() is not None:  # canceled, or the prediction's own time limit
                    item.error = exc
                    continue
                timed_out = EnhanceFailed(f"the prompt enhancer {exc}")  # its own limit: a failed rewrite
                if asked == "best_effort":
                    item.report.note(f"prompt not enhanced ({timed_out}); generating from the original prompt")
                else:
                    item.error = timed_out
                continue
            except Exception as exc:  # the rewrite failed, or could not be stored
                if not isinstance(exc, EnhanceFailed):
                    log.exception("the rewrite of %s could not be stored", item.row["id"])
                reason = str(exc) if isinstance(exc, EnhanceFailed) else "the prompt enhancer's result was not stored"
                if asked == "best_effort":
                    item.report.note(f"prompt not enhanced ({reason}); generating from the original prompt")
                else:
                    item.error = EnhanceFailed(reason)
                continue
            item.timings["enhance_ms"] = enhanced.timings.get("enhance_ms", 0)
            item.row["enhanced_prompt"] = enhanced.prompt
            item.row["params"] = params | {"prompt": enhanced.prompt}
            item.report.note(
                f"prompt enhanced by {enhanced.model}: {enhanced.new_tokens} tokens in {item.timings['enhance_ms']} ms"
            )

    def _within(self, lease: Lease) -> Callable[[], str | None]:
        """A prediction's rewrite stops for the prediction's own reasons (cancel, its time limit) or at the
        enhancer's time limit."""
        limit = self.settings.enhancer_timeout_s
        deadline = time.monotonic() + limit

        def reason() -> str | None:
            return lease.stop_reason() or (f"timed out after {limit:g} s" if time.monotonic() > deadline else None)

        return reason

    def _keep(self, conn: Connection, item: Item, enhanced: Enhanced) -> None:
        """The rewrite stored with the prediction and its enhancement recorded and billed: one statement."""
        row = item.row
        values = {
            "prediction_id": row["id"],
            "enhanced": enhanced.prompt,
            "job_id": new_id(),
            "job_input": {"prompt": row["params"]["prompt"], "style": None},
            "job_output": enhanced.prompt,
            "job_enhancer": enhanced.model,
            "job_tokens": enhanced.new_tokens,
            "job_timings": enhanced.timings,
        }
        if conn.execute(self.keep, values).first() is None:
            raise Stop("canceled or taken over by another worker")

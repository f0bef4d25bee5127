"""The database schema (SQLAlchemy Core). Alembic migrations create it; keep both in step."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()
FLAGGED = "safety @> '{\"flagged\": [true]}'"  # a prediction with an output the image checker flagged
# A generated prediction whose outputs may answer identical requests (core/result_cache.py).
CACHED = "cache_key IS NOT NULL AND cached_from IS NULL AND status = 'completed' AND expired_at IS NULL"

tenants = Table(
    "tenants",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Limits and price plan; NULL means the platform default from core.settings.
    Column("rate_limit_per_minute", Integer),  # per key
    Column("max_in_flight", Integer),
    Column("price_per_image", Numeric(12, 6)),
    Column("tenant_rate_limit_per_minute", Integer),  # all keys together; NULL: the per-key limit
    Column("retention_s", Integer),  # outputs and references kept after a prediction finishes (core/retention.py)
    Column("suspended_at", DateTime(timezone=True)),  # an operator suspended it: submits refused; NULL: active
    # Safety (core/safety.py, docs/safety.md): NULL means block, not allowed, no terms of its own.
    Column("safety_policy", String(8)),
    Column("allow_disable_safety_checker", Boolean),
    Column("blocked_terms", JSONB),  # added to the operator's prompt blocklist
    # The result cache (docs/cache.md): NULL means on, and the platform's cache price.
    Column("result_cache", Boolean),
    Column("cache_price_per_image", Numeric(12, 6)),
    Column("price_per_enhancement", Numeric(12, 6)),  # the prompt enhancer's (core/enhance_jobs.py)
    Column("batch_price_per_image", Numeric(12, 6)),  # batch work's price (docs/batch.md); NULL: the default
    CheckConstraint(
        "safety_policy IS NULL OR safety_policy IN ('block', 'blur', 'flag')", name="tenants_safety_policy_valid"
    ),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant_id", String(32), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False, server_default=""),
    Column("prefix", String(16), nullable=False),  # shown to users to recognise a key
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 hex; the key itself is never stored
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_used_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
)

predictions = Table(
    "predictions",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant_id", String(32), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    # The submitting key, deliberately without a foreign key: its check locked the key's row on every insert
    # (migrations/versions/0004). Keys are never deleted but with their tenant, whose predictions go too.
    Column("api_key_id", String(32)),
    Column("model", Text, nullable=False),
    Column("input", JSONB, nullable=False),  # the validated input as the client sent it, defaults filled
    Column("params", JSONB, nullable=False),  # models.klein.GenerationParams: what the worker runs, seed resolved
    Column("status", String(16), nullable=False, server_default="created"),
    Column("outputs", JSONB, nullable=False, server_default="[]"),
    Column("error", Text),
    Column("timings", JSONB, nullable=False, server_default="{}"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("worker_id", Text),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("started_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
    # Where to send events (api/services/webhooks.py): {"url", "events", "dialect"[, "secret"]}; a trigger
    # (migrations/versions/0007) writes a webhook_deliveries row in the transaction of each transition it names.
    Column("webhook", JSONB),
    Column("priority", SmallInteger, nullable=False, server_default="0"),  # the queue's (core.quota.queue_priority)
    Column("logs", JSONB, nullable=False, server_default="[]"),  # [{"at", "message"}], written with the result
    Column("expired_at", DateTime(timezone=True)),  # its objects were deleted (core/retention.py); NULL: present
    Column("safety", JSONB),  # what the image checker found and did (core/safety.py); NULL: from before it
    # Deadlines (core/deadlines.py): canceled if not started by the first, or still running at the second.
    Column("start_deadline_at", DateTime(timezone=True)),
    Column("deadline_at", DateTime(timezone=True)),
    # The result cache (docs/cache.md): what determines the output (NULL: not cacheable), and the prediction whose
    # stored outputs answered this one (NULL: generated). No foreign key: rows go only with their tenant.
    Column("cache_key", String(64)),
    Column("cached_from", String(32)),
    Column("enhanced_prompt", Text),  # the prompt enhancer's rewrite it was generated from (docs/enhancer.md)
    Column("batch_id", String(32)),  # the batch whose line it runs (core/batches.py); NULL: interactive
    CheckConstraint(
        "status IN ('created', 'processing', 'completed', 'failed', 'canceled')", name="predictions_status_valid"
    ),
    Index("predictions_tenant_created", "tenant_id", "created_at"),
    # The sweeper's scans (core/sweeper.py): only the rows in each state, not the whole history.
    Index("predictions_waiting", "created_at", postgresql_where=text("status = 'created'")),
    Index("predictions_leased", "lease_expires_at", postgresql_where=text("status = 'processing'")),
    Index("predictions_failed", "completed_at", postgresql_where=text("status = 'failed'")),  # the console's
    # A worker's look for companions of its claim, in the queue's order (core/lifecycle.py, batch_candidates).
    Index("predictions_batchable", "model", "priority", "created_at", postgresql_where=text("status = 'created'")),
    # The sweeper's look for queued predictions whose deadline passed (core/sweeper.py).
    Index(
        "predictions_start_deadline",
        "start_deadline_at",
        postgresql_where=text("status = 'created' AND start_deadline_at IS NOT NULL"),
    ),
    # The operators' list of what the image checker flagged (GET /admin/v1/flagged), newest first.
    Index("predictions_flagged", "completed_at", postgresql_where=text(FLAGGED)),
    # The reaper's scan (core/retention.py): finished rows whose objects are still stored, per tenant by age.
    Index(
        "predictions_unexpired",
        "tenant_id",
        "completed_at",
        postgresql_where=text("expired_at IS NULL AND status IN ('completed', 'failed', 'canceled')"),
    ),
    # The result cache's lookup (core/result_cache.py) and the expiry of an original's cached answers.
    Index("predictions_cache", "tenant_id", "cache_key", postgresql_where=text(CACHED)),
    Index("predictions_cached_from", "cached_from", postgresql_where=text("cached_from IS NOT NULL")),
    # The batch feeder's counts of each tenant's queued and running batch predictions (core/batches.py).
    Index(
        "predictions_batch_open",
        "tenant_id",
        postgresql_where=text("batch_id IS NOT NULL AND status IN ('created', 'processing')"),
    ),
    Index("predictions_batch", "batch_id", postgresql_where=text("batch_id IS NOT NULL")),
)

# One row per completed prediction, written in the same transaction that completes it.
usage_records = Table(
    "usage_records",
    metadata,
    Column("prediction_id", String(32), ForeignKey("predictions.id", ondelete="CASCADE"), primary_key=True),
    Column("tenant_id", String(32), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("api_key_id", String(32), ForeignKey("api_keys.id", ondelete="SET NULL")),
    Column("model", Text, nullable=False),
    Column("images", Integer, nullable=False),
    Column("megapixels", Numeric(10, 4), nullable=False),  # per image
    Column("steps", Integer, nullable=False),
    Column("price_per_image", Numeric(12, 6), nullable=False),  # the tenant's price when it completed
    Column("amount", Numeric(14, 6), nullable=False),
    Column("batch", Boolean, nullable=False, server_default=text("false")),  # batch work, priced apart
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("usage_tenant_created", "tenant_id", "created_at"),
)

# One row per prompt enhancement (docs/enhancer.md): standalone (POST /v1/prompts/enhance) or a prediction's.
# Leased like a prediction by the worker running it; `amount` is billed by the statement that completes it.
enhancements = Table(
    "enhancements",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant_id", String(32), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("api_key_id", String(32)),
    Column("prediction_id", String(32), ForeignKey("predictions.id", ondelete="CASCADE")),
    Column("model", Text, nullable=False),
    Column("input", JSONB, nullable=False),  # {"prompt", "style", "references"}
    Column("status", String(16), nullable=False, server_default="created"),
    Column("output", Text),  # the rewrite
    Column("enhancer", Text),  # the language model that wrote it
    Column("error", Text),
    Column("timings", JSONB, nullable=False, server_default="{}"),
    Column("tokens", Integer),  # new tokens generated
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("worker_id", Text),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("price", Numeric(12, 6)),  # the tenant's price when it completed
    Column("amount", Numeric(14, 6)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("started_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
    CheckConstraint(
        "status IN ('created', 'processing', 'completed', 'failed', 'canceled')", name="enhancements_status_valid"
    ),
    Index("enhancements_tenant_created", "tenant_id", "created_at"),
    Index("enhancements_prediction", "prediction_id"),
)

# Files uploaded for use as reference images (`POST /v1/files`), stored under <tenant>/files/.
files = Table(
    "files",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant_id", String(32), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("key", Text, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("width", Integer),  # images only; a LoRA (application/vnd.safetensors) has none
    Column("height", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    # Batch files (docs/batch.md): purpose `batch` (an uploaded input, JSONL), `batch_output` (an output or error
    # file, rendered from its batch's rows when downloaded); NULL: a reference image or LoRA.
    Column("purpose", String(16)),
    Column("filename", Text),
    Column("batch_id", String(32)),
    Index("files_expires", "expires_at"),  # the reaper's scan (core/retention.py)
)

# LoRA adapters accepted with a prediction (api/services/loras.py), stored per tenant and content at
# `loras/<tenant_id>/<sha256>.safetensors` (never shared: docs/lora.md); their bytes count against the tenant
# (KLEIN_MAX_TENANT_LORA_BYTES). The reaper (core/retention.py) deletes those unused for KLEIN_LORA_RETENTION_S
# that none of the tenant's queued or running predictions names, object then row.
loras = Table(
    "loras",
    metadata,
    Column("tenant_id", String(32), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("sha256", String(64), primary_key=True),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_used_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("loras_last_used", "last_used_at"),
)


# Standard Webhooks signing secrets (`whsec_…`), per tenant. The current one has no `retires_at`; after a
# rotation the previous one keeps signing beside it until then. Readable by the tenant, so stored as is.
webhook_secrets = Table(
    "webhook_secrets",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant_id", String(32), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("secret", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("retires_at", DateTime(timezone=True)),
    Index("webhook_secrets_current", "tenant_id", unique=True, postgresql_where=text("retires_at IS NULL")),
)

# One row per event to send: written by the trigger on predictions, sent by the webhook worker
# (worker/webhooks.py). Its id is the `webhook-id` of every attempt.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(32), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("prediction_id", String(32), ForeignKey("predictions.id", ondelete="CASCADE"), nullable=False),
    Column("event", String(16), nullable=False),  # start, output, completed
    Column("url", Text, nullable=False),
    Column("snapshot", JSONB, nullable=False),  # the prediction's row at the event, less input, params, webhook
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("lease_expires_at", DateTime(timezone=True)),  # while `sending`
    Column("kicked_at", DateTime(timezone=True), server_default=func.now()),  # a task was last queued for it
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()),
    Column("finished_at", DateTime(timezone=True)),
    CheckConstraint(
        "status IN ('pending', 'sending', 'delivered', 'failed', 'gone')", name="webhook_deliveries_status_valid"
    ),
    Index("webhook_deliveries_due", "next_attempt_at", postgresql_where=text("status IN ('pending', 'sending')")),
    Index("webhook_deliveries_tenant_created", "tenant_id", "created_at"),
    Index("webhook_deliveries_prediction", "prediction_id"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("delivery_id", String(40), ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), nullable=False),
    Column("attempted_at", DateTime(timezone=True), nullable=False),
    Column("status_code", Integer),  # None: no answer (timeout, refused, connection error)
    Column("latency_ms", Integer, nullable=False),
    Column("response_head", Text, nullable=False, server_default=""),  # the answer's first bytes
    Column("error", Text),
    Index("webhook_attempts_delivery", "delivery_id"),
)


# Batch jobs (core/batches.py, docs/batch.md): a batch, and one row per line of its input. A line's prediction is
# made by the feeder when the batch's turn comes; a line refused at validation keeps its `error` and never runs.
BATCH_STATUSES = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
batches = Table(
    "batches",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant_id", String(32), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("api_key_id", String(32)),
    Column("dialect", String(8), nullable=False),  # openai (a JSONL file) or pruna (native, a list of inputs)
    Column("endpoint", Text, nullable=False),
    Column("input_file_id", String(32)),
    Column("completion_window", String(8), nullable=False),
    Column("metadata", JSONB(none_as_null=True)),
    Column("webhook", JSONB(none_as_null=True)),  # native: {"url", "base_url"}, one delivery when the batch ends
    Column("status", String(16), nullable=False, server_default="in_progress"),
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False, server_default="0"),  # request_counts, set when it ends
    Column("failed", Integer, nullable=False, server_default="0"),
    Column("output_file_id", String(32)),
    Column("error_file_id", String(32)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("cancelling_at", DateTime(timezone=True)),
    Column("expired_at", DateTime(timezone=True)),  # its window ended: what had not started never will
    Column("finished_at", DateTime(timezone=True)),
    CheckConstraint(f"status IN ({', '.join(repr(s) for s in BATCH_STATUSES)})", name="batches_status_valid"),
    Index("batches_tenant_created", "tenant_id", "created_at"),
    Index("batches_open", "created_at", postgresql_where=text("status IN ('in_progress', 'cancelling')")),
)

batch_requests = Table(
    "batch_requests",
    metadata,
    Column("batch_id", String(32), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    Column("line", Integer, primary_key=True),  # 1-based, as the input file numbers it
    Column("custom_id", Text, nullable=False),
    Column("model", Text),
    Column("input", JSONB(none_as_null=True)),  # the prediction's input, and how its result is rendered
    Column("params", JSONB(none_as_null=True)),  # models.klein.GenerationParams
    Column("error", JSONB(none_as_null=True)),  # {"message", "param", "code"}: refused at validation
    Column("prediction_id", String(32)),
    Index("batch_requests_unfed", "batch_id", "line", postgresql_where=text("prediction_id IS NULL AND error IS NULL")),
)

"""Every setting of the platform, in one object read from the environment (prefix KLEIN_)."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_ADMIN_KEY_LENGTH = 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KLEIN_", extra="ignore")

    # PostgreSQL; the driver suffix is added per tier (asyncpg in the API, psycopg in workers).
    database_url: str = "postgresql://postgres@127.0.0.1:5432/klein"
    db_pool_size: int = Field(
        20, ge=1
    )  # per API pool, two per process (api/infra/pg.py, core/db.py); see docs/scaling.md
    # False behind a PgBouncer in transaction pooling mode that does not keep prepared statements (before 1.21):
    # no driver prepares or caches a named statement (api/infra/pg.py, core/db.py; docs/scaling.md).
    db_prepared_statements: bool = True
    # Batches of concurrent submits' inserts (and of status reads) at once, per API process (api/infra/rows.py).
    db_batches: int = Field(2, ge=1)
    # Redis: Celery broker and completion events. Every client is built from these (core/redis_connection.py).
    # redis:// or rediss:// (TLS), with the database and optionally credentials; with Sentinels, its host is unused.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # TLS (rediss://): the server is verified against this CA (else the system's); a client certificate if asked.
    redis_ca_file: str | None = None
    redis_cert_file: str | None = None
    redis_key_file: str | None = None
    # ACL user and password; they take precedence over the URL's.
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    # Sentinel: "host:port" of each Sentinel (empty: no Sentinel) and the service whose primary to use. Sentinels
    # are reached with the same TLS settings, and with their own credentials if they require any.
    redis_sentinels: list[str] = []
    redis_sentinel_service: str = "mymaster"
    redis_sentinel_username: str | None = None
    redis_sentinel_password: SecretStr | None = None
    # Celery queue name; also namespaces the Redis event channel.
    queue_name: str = "klein"

    # S3-compatible object storage for outputs.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_bucket: str = "klein-outputs"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None

    # Worker: a local diffusers folder or a hub id, and the device ("auto" picks CUDA when present).
    model_path: str = "black-forest-labs/FLUX.2-klein-4B"
    model_id: str = "flux-klein-4b"  # the registry's model this worker serves (models/registry.py), on its own queue
    # API: the models workers are run for; a submit naming another is refused with this list (klein up --model).
    served_models: list[str] = ["flux-klein-4b"]
    device: str = "auto"
    # Reliability: a worker's claim is a lease it renews every lease_s / 3 while it works; a lapsed
    # lease means the worker died, and the sweeper puts the prediction back in the queue.
    lease_s: float = Field(30.0, ge=1)
    task_time_limit_s: float = Field(600.0, ge=1)  # a prediction running longer fails with a timeout
    max_attempts: int = Field(3, ge=1)  # worker losses before a prediction fails for good
    sweep_interval_s: float = Field(10.0, gt=0)
    requeue_grace_s: float = Field(30.0, ge=0)  # a `created` row this old and not in the broker is re-enqueued
    db_retry_s: float = Field(60.0, ge=0)  # workers retry database writes this long (e.g. across a restart)
    s3_max_attempts: int = Field(4, ge=1)  # boto3 retries with exponential backoff
    # Each S3 attempt's waits: to connect, and for each read of an answer (a stalled server fails the attempt).
    s3_connect_timeout_s: float = Field(2.0, gt=0, le=60)
    s3_read_timeout_s: float = Field(10.0, gt=0, le=300)
    # Micro-batching (worker/batch.py): a claim takes along queued predictions that can share its pipeline
    # call, up to batch_size images in all, looking again once after batch_window_ms. 1: off.
    batch_size: int = Field(1, ge=1, le=16)
    batch_window_ms: float = Field(5.0, ge=0, le=1000)
    # LoRA adapters (docs/lora.md): per request, their size; a worker's caches of them (disk, memory; LRU by
    # bytes) and how many predictions in a row it may take ahead of the queue's order for the set it has loaded.
    max_loras: int = Field(3, ge=0, le=8)
    max_lora_bytes: int = Field(256 * 2**20, ge=1024)
    # Stored LoRAs (api/services/loras.py): the bytes of those a tenant named, at most; each deleted this long
    # after a request last named it (core/retention.py), unless a queued or running prediction still does.
    max_tenant_lora_bytes: int = Field(2 * 2**30, ge=0)
    lora_retention_s: int = Field(7 * 24 * 3600, ge=60)
    lora_cache_dir: str = "/tmp/klein-loras"
    lora_disk_cache_bytes: int = Field(4 * 2**30, ge=0)
    lora_memory_cache_bytes: int = Field(2 * 2**30, ge=0)
    lora_affinity_streak: int = Field(4, ge=0)

    # Tenants: defaults for tenants without their own limits and price plan.
    default_rate_limit_per_minute: int = Field(150, ge=1)  # per API key, every authenticated request
    max_keys_per_tenant: int = Field(20, ge=1)  # active (unrevoked, unexpired) keys
    default_max_in_flight: int = Field(500, ge=1)  # per tenant, queued + processing
    default_price_per_image: float = Field(0.0001, ge=0)  # USD
    default_cache_price_per_image: float = Field(0.0, ge=0)  # USD, an answer from the result cache (docs/cache.md)
    admin_api_key: SecretStr | None = None  # enables /admin/v1 when set
    admin_url: str = "http://127.0.0.1:8000"  # where the `klein` CLI's operator actions reach the API (ops/actions.py)
    admin_failures_per_minute: int = Field(10, ge=1)  # wrong admin keys per client address, then 429
    idempotency_ttl_s: int = Field(24 * 3600, ge=60)
    # How long an Idempotency-Key outlives an API process that died while accepting its request (renewed while alive).
    idempotency_lease_s: float = Field(10.0, ge=1, le=300)
    key_cache_ttl_s: float = Field(10.0, ge=0)  # API-process cache of key lookups; revocations clear it at once

    # API
    public_base_url: str | None = None  # e.g. https://images.example.com; else the request's own
    # Host headers answered (others get 400): our URLs are built from the Host when public_base_url is unset.
    # public_base_url's host is always allowed; "*.example.com" matches subdomains, "*" any host.
    allowed_hosts: list[str] = ["localhost", "127.0.0.1"]
    try_sync_timeout_s: float = Field(60.0, ge=0, le=600)
    max_sync_waits_per_tenant: int = Field(200, ge=0)  # per API process; beyond it Try-Sync answers at once
    max_body_bytes: int = Field(32 << 20, ge=1024)  # room for 4 base64 reference images

    # Input images (uploads, URLs, data URIs): limits before and after decoding.
    max_image_bytes: int = Field(10 << 20, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)  # decompression bombs stop here
    max_concurrent_decodes: int = Field(1, ge=1)  # per API process, in a thread off the event loop
    fetch_timeout_s: float = Field(10.0, gt=0, le=120)
    # Hosts or networks (CIDR) whose URLs may be fetched although they are private (private deployments, tests).
    fetch_allowlist: list[str] = []
    upload_ttl_s: int = Field(24 * 3600, ge=60)  # how long an uploaded file stays referenceable
    max_tenant_upload_bytes: int = Field(2 * 2**30, ge=0)  # a tenant's unexpired uploads (/v1/files), at most
    # How long a finished prediction's outputs and references are kept, unless its tenant sets its own
    # (core/retention.py; 0: nothing after a synchronous answer delivered them).
    default_retention_s: int = Field(7 * 24 * 3600, ge=0)
    # Signed delivery URLs (OpenAI `url`, 1min `temporaryUrl`) open without an API key until they expire.
    # Set the same key on every API replica; unset, each process makes its own (links then break on restart).
    url_signing_key: SecretStr | None = None
    signed_url_ttl_s: int = Field(3600, ge=60)

    # Events out (docs/events.md): webhooks, sent by the webhook worker (worker/webhooks.py), and progress.
    webhook_timeout_s: float = Field(10.0, gt=0, le=60)  # an attempt's whole time, connect to answer; then it fails
    webhook_retry_base_s: float = Field(5.0, gt=0)  # the first retry's delay; each next one three times longer…
    webhook_retry_max_s: float = Field(4 * 3600.0, gt=0)  # …up to this, with ±20 % jitter…
    webhook_retry_window_s: float = Field(24 * 3600.0, ge=0)  # …until an attempt fails this long after the event
    webhook_concurrency: int = Field(32, ge=1)  # sends at once per webhook worker (threads: they wait on sockets)
    webhook_tenant_concurrency: int = Field(8, ge=1)  # a tenant's deliveries being sent at once, all workers together
    webhook_poll_interval_s: float = Field(1.0, gt=0)  # how often due retries and lost sends are looked for
    webhook_secret_overlap_s: int = Field(24 * 3600, ge=0)  # a rotated secret keeps signing this long
    progress_interval_s: float = Field(0.25, ge=0)  # a worker reports denoising steps at most this often
    stream_refresh_s: float = Field(5.0, gt=0)  # event streams re-send a queued prediction's position this often
    # A worker whose heartbeat (every ~2 s) is older is not counted live: queue ETAs, "no worker online", the console.
    live_worker_s: float = Field(30.0, gt=2)
    max_streams_per_tenant: int = Field(1000, ge=1)  # open event streams per tenant and API process, then 429

    # Batch jobs (docs/batch.md, core/batches.py): an input file's lines and bytes, a tenant's batches not yet ended,
    # the batch predictions queued at once (all tenants; at least the GPU workers serving batches), the shortest
    # completion window taken, and how long before its window ends a batch's lines queue as interactive work does.
    batch_max_lines: int = Field(50_000, ge=1)
    batch_max_file_bytes: int = Field(30 << 20, ge=1024)  # an upload's body is bounded by max_body_bytes too
    batch_max_in_flight: int = Field(16, ge=1)
    batch_feed_depth: int = Field(4, ge=1)
    batch_min_window_s: int = Field(3600, ge=1)
    batch_urgent_s: float = Field(3600.0, ge=0)
    default_batch_price_per_image: float = Field(0.00005, ge=0)  # USD, for tenants without their own

    # Operating it (docs/operations.md): logs, metrics.
    log_format: str = Field("json", pattern="^(json|console)$")  # console: readable lines (`klein up`)
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")  # DEBUG also logs prompts
    # The workers' /metrics answer without a token: bind them where only Prometheus reaches (`klein up`: loopback).
    worker_metrics_host: str = "0.0.0.0"
    worker_metrics_port: int = Field(29101, ge=0, le=65535)  # a GPU worker's /metrics; 0: none
    webhook_metrics_port: int = Field(29100, ge=0, le=65535)  # the webhook worker's /metrics; 0: none
    # The API logs a line per answer (with request id, tenant, prediction, dialect); probes at debug level only.
    access_log: bool = True
    # Receiver hosts with a webhook backlog series of their own (the most waiting); the rest are summed as "other".
    metrics_webhook_receivers: int = Field(10, ge=1, le=100)
    metrics_per_tenant: bool = False  # in-flight per tenant on the API's /metrics (a series per tenant)
    metrics_token: SecretStr | None = None  # if set, GET /metrics wants `Authorization: Bearer <token>`
    metrics_refresh_s: float = Field(5.0, ge=0)  # the API reads its platform gauges (SQL, Redis) at most this often

    # Safety (docs/safety.md). The image checker: an image-classification folder or hub id (loaded offline like the
    # Klein weights; unset: no checker runs, and every result says `checked: false`), the labels of its id2label
    # that count as unsafe, and the probability (summed over those labels) from which an output is flagged.
    safety_model: str | None = None
    safety_labels: list[str] = ["nsfw"]
    safety_threshold: float = Field(0.5, gt=0, le=1)
    # The prompt policy's operator file: one blocked term or phrase per line (# comments); tenants add their own.
    prompt_blocklist: str | None = None

    # The prompt enhancer (docs/enhancer.md): `local` runs the worker's own Qwen3 text encoder as a causal LM (all
    # its layers kept: ≈ 1.6 GB more GPU memory in bf16), `openai` calls an OpenAI-compatible chat endpoint,
    # `off` refuses enhancement (501).
    enhancer: str = Field("local", pattern="^(local|openai|off)$")
    enhancer_url: str | None = None  # openai: the API's base URL, e.g. http://vllm:8000/v1 (…/chat/completions)
    enhancer_model: str = "Qwen/Qwen3-4B"  # openai: the `model` sent; local: reported only
    enhancer_api_key: SecretStr | None = None  # openai: sent as `Authorization: Bearer …`
    # openai: hosts or networks (CIDR) the endpoint may be on although private (as fetch_allowlist is for fetches).
    enhancer_allowlist: list[str] = []
    enhancer_max_tokens: int = Field(160, ge=1, le=1024)  # new tokens per rewrite, at most
    enhancer_timeout_s: float = Field(30.0, gt=0, le=600)  # one enhancement's time, then it fails
    default_price_per_enhancement: float = Field(0.00002, ge=0)  # USD, for tenants without their own price

    # Worker speed switches (see models/optimize.py); all off means the plain diffusers pipeline.
    dtype: str = Field("auto", pattern="^(auto|bfloat16|float16|float32)$")  # auto: bf16 on CUDA, fp32 on CPU
    attention_backend: str = "auto"  # auto: FA3, flash-attn, cuDNN SDPA (first that works) on CUDA; native on CPU
    fuse_qkv: bool = True  # one QKV matmul per double-stream block
    truncate_text_encoder: bool = True  # run text-encoder layers up to the last one read (27), skip the logits
    prompt_cache_size: int = Field(32, ge=0)  # LRU of prompt embeddings (≈ 7.9 MB each in bf16); 0 disables
    vae_channels_last: bool = True
    cudnn_benchmark: bool = True  # CUDA only: autotuned convolution algorithms
    compile_transformer: bool = False  # torch.compile the repeated blocks, static shapes, compiled at start
    compile_vae: bool = False  # torch.compile the VAE decoder, static shapes, compiled at start
    compile_mode: str = "default"  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    fp8: bool = False  # torchao float8 activations + weights in the transformer blocks (CUDA, SM ≥ 8.9)
    # Run at start: "WxH", or "WxH+WxH…" with reference sizes. Unset: every aspect-ratio size if compiling.
    warmup_sizes: list[str] | None = None

    @field_validator("admin_api_key", "url_signing_key", "metrics_token", "enhancer_api_key", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        # `KLEIN_ADMIN_API_KEY=` must disable the admin API, not open it to an empty key.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("admin_api_key")
    @classmethod
    def _admin_key_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        # The right key always works, even from an address throttled for wrong ones (api/routes/admin.py), so
        # the key's length, not the throttle, is what makes guessing it hopeless.
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_KEY_LENGTH:
            raise ValueError(
                f"KLEIN_ADMIN_API_KEY must be at least {MIN_ADMIN_KEY_LENGTH} characters (e.g. `openssl rand -hex 24`)"
            )
        return value

    def secret_values(self) -> list[str]:
        """The values of every secret setting that is set, for the logs to mask (core/logs.py)."""
        return [value.get_secret_value() for value in self.__dict__.values() if isinstance(value, SecretStr)]

    @property
    def trusted_hosts(self) -> list[str]:
        """allowed_hosts, and the host of public_base_url."""
        public = urlsplit(self.public_base_url).hostname if self.public_base_url else None
        return [*self.allowed_hosts, *([public] if public else [])]

    @property
    def async_database_url(self) -> str:
        return _with_driver(self.database_url, "asyncpg")

    @property
    def sync_database_url(self) -> str:
        return _with_driver(self.database_url, "psycopg")

    @property
    def libpq_database_url(self) -> str:
        """The URL without a SQLAlchemy driver, as asyncpg and libpq take it."""
        return _with_driver(self.database_url, None)

    @property
    def events_channel(self) -> str:
        return f"{self.queue_name}:done"

    @property
    def progress_channel(self) -> str:
        """A prediction's id, published when its event stream (core/progress.py) has a new entry."""
        return f"{self.queue_name}:progress"

    @property
    def keys_channel(self) -> str:
        return f"{self.queue_name}:keys-changed"


def _with_driver(url: str, driver: str | None) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    if scheme.split("+")[0] not in ("postgresql", "postgres"):
        return url
    return f"postgresql+{driver}://{rest}" if driver else f"postgresql://{rest}"


@lru_cache
def get_settings() -> Settings:
    return Settings()

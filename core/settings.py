"""Every setting of the platform, in one object read from the environment (prefix KLEIN_)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KLEIN_", extra="ignore")

    # PostgreSQL; the driver suffix is added per tier (asyncpg in the API, psycopg in workers).
    database_url: str = "postgresql://postgres@127.0.0.1:5432/klein"
    # Redis: Celery broker and completion events.
    redis_url: str = "redis://127.0.0.1:6379/0"
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
    device: str = "auto"
    # A prediction held longer than this by a worker may be claimed again (worker presumed dead).
    task_time_limit_s: int = Field(600, ge=10)

    # Tenants: defaults for tenants without their own limits and price plan.
    default_rate_limit_per_minute: int = Field(150, ge=1)  # per API key, every authenticated request
    default_max_in_flight: int = Field(500, ge=1)  # per tenant, queued + processing
    default_price_per_image: float = Field(0.0001, ge=0)  # USD
    admin_api_key: SecretStr | None = None  # enables /admin/v1 when set
    idempotency_ttl_s: int = Field(24 * 3600, ge=60)

    # API
    public_base_url: str | None = None  # e.g. https://images.example.com; else the request's own
    try_sync_timeout_s: float = Field(60.0, ge=0, le=600)
    max_body_bytes: int = Field(1 << 20, ge=1024)

    @property
    def async_database_url(self) -> str:
        return _with_driver(self.database_url, "asyncpg")

    @property
    def sync_database_url(self) -> str:
        return _with_driver(self.database_url, "psycopg")

    @property
    def events_channel(self) -> str:
        return f"{self.queue_name}:done"


def _with_driver(url: str, driver: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    return f"postgresql+{driver}://{rest}" if scheme.split("+")[0] in ("postgresql", "postgres") else url


@lru_cache
def get_settings() -> Settings:
    return Settings()

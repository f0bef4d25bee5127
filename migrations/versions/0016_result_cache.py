"""the result cache (docs/cache.md): a prediction's cache key, the original a cached one was answered from, and
the tenant's cache settings

predictions: `cache_key` (sha256 of what determines the output, api/services/result_cache.py; NULL: not
cacheable) and `cached_from` (the prediction whose stored outputs answered this one; NULL: generated). The lookup
reads the partial index `predictions_cache` (generated, completed, unexpired rows by tenant and key); expiring an
original expires its cached answers through `predictions_cached_from`.
tenants: `result_cache` (NULL: on; false: the operator opted the tenant out) and `cache_price_per_image` (NULL:
KLEIN_DEFAULT_CACHE_PRICE_PER_IMAGE).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CACHED = "cache_key IS NOT NULL AND cached_from IS NULL AND status = 'completed' AND expired_at IS NULL"


def upgrade() -> None:
    op.add_column("predictions", sa.Column("cache_key", sa.String(64)))
    op.add_column("predictions", sa.Column("cached_from", sa.String(32)))
    op.create_index("predictions_cache", "predictions", ["tenant_id", "cache_key"], postgresql_where=sa.text(CACHED))
    op.create_index(
        "predictions_cached_from", "predictions", ["cached_from"], postgresql_where=sa.text("cached_from IS NOT NULL")
    )
    op.add_column("tenants", sa.Column("result_cache", sa.Boolean))
    op.add_column("tenants", sa.Column("cache_price_per_image", sa.Numeric(12, 6)))


def downgrade() -> None:
    op.drop_column("tenants", "cache_price_per_image")
    op.drop_column("tenants", "result_cache")
    op.drop_index("predictions_cached_from", "predictions")
    op.drop_index("predictions_cache", "predictions")
    op.drop_column("predictions", "cached_from")
    op.drop_column("predictions", "cache_key")

"""tenant limits and price plan, usage records

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("rate_limit_per_minute", sa.Integer))
    op.add_column("tenants", sa.Column("max_in_flight", sa.Integer))
    op.add_column("tenants", sa.Column("price_per_image", sa.Numeric(12, 6)))
    op.create_table(
        "usage_records",
        sa.Column(
            "prediction_id", sa.String(32), sa.ForeignKey("predictions.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("api_key_id", sa.String(32), sa.ForeignKey("api_keys.id", ondelete="SET NULL")),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("images", sa.Integer, nullable=False),
        sa.Column("megapixels", sa.Numeric(10, 4), nullable=False),
        sa.Column("steps", sa.Integer, nullable=False),
        sa.Column("price_per_image", sa.Numeric(12, 6), nullable=False),
        sa.Column("amount", sa.Numeric(14, 6), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("usage_tenant_created", "usage_records", ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_table("usage_records")
    op.drop_column("tenants", "price_per_image")
    op.drop_column("tenants", "max_in_flight")
    op.drop_column("tenants", "rate_limit_per_minute")

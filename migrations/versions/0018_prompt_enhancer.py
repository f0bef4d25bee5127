"""the prompt enhancer (docs/enhancer.md)

predictions: `enhanced_prompt`, the rewrite a prediction asking for `enhance_prompt` was generated from (NULL: none).
tenants: `price_per_enhancement` (NULL: KLEIN_DEFAULT_PRICE_PER_ENHANCEMENT).
enhancements: one row per enhancement job, standalone (`POST /v1/prompts/enhance`) or a prediction's
(`prediction_id`), leased by the worker that runs it and billed (`amount`) in the statement that completes it.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("enhanced_prompt", sa.Text))
    op.add_column("tenants", sa.Column("price_per_enhancement", sa.Numeric(12, 6)))
    op.create_table(
        "enhancements",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("api_key_id", sa.String(32)),
        sa.Column("prediction_id", sa.String(32), sa.ForeignKey("predictions.id", ondelete="CASCADE")),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("input", JSONB, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="created"),
        sa.Column("output", sa.Text),
        sa.Column("enhancer", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("timings", JSONB, nullable=False, server_default="{}"),
        sa.Column("tokens", sa.Integer),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("worker_id", sa.Text),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("price", sa.Numeric(12, 6)),
        sa.Column("amount", sa.Numeric(14, 6)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            "status IN ('created', 'processing', 'completed', 'failed', 'canceled')", name="enhancements_status_valid"
        ),
    )
    op.create_index("enhancements_tenant_created", "enhancements", ["tenant_id", "created_at"])
    op.create_index("enhancements_prediction", "enhancements", ["prediction_id"])


def downgrade() -> None:
    op.drop_table("enhancements")
    op.drop_column("tenants", "price_per_enhancement")
    op.drop_column("predictions", "enhanced_prompt")

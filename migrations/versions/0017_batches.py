"""batch jobs (docs/batch.md): batches, their requests, and what ties predictions, files and usage to them

batches: one per batch (OpenAI's Batch API or our native `POST /v1/batches`), its state and timestamps.
batch_requests: one per input line; `prediction_id` once the feeder (core/batches.py) made its prediction,
`error` for a line refused at validation (it fails alone, into the error file).
predictions.batch_id, files.purpose/filename/batch_id, tenants.batch_price_per_image, usage_records.batch.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "'in_progress', 'finalizing', 'completed', 'failed', 'expired', 'cancelling', 'cancelled'"


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("api_key_id", sa.String(32)),
        sa.Column("dialect", sa.String(8), nullable=False),
        sa.Column("endpoint", sa.Text, nullable=False),
        sa.Column("input_file_id", sa.String(32)),
        sa.Column("completion_window", sa.String(8), nullable=False),
        sa.Column("metadata", JSONB),
        sa.Column("webhook", JSONB),
        sa.Column("status", sa.String(16), nullable=False, server_default="in_progress"),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("completed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("output_file_id", sa.String(32)),
        sa.Column("error_file_id", sa.String(32)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelling_at", sa.DateTime(timezone=True)),
        sa.Column("expired_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(f"status IN ({STATUSES})", name="batches_status_valid"),
    )
    op.create_index("batches_tenant_created", "batches", ["tenant_id", "created_at"])
    op.create_index(
        "batches_open", "batches", ["created_at"], postgresql_where=sa.text("status IN ('in_progress', 'cancelling')")
    )
    op.create_table(
        "batch_requests",
        sa.Column("batch_id", sa.String(32), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True),
        sa.Column("custom_id", sa.Text, nullable=False),
        sa.Column("model", sa.Text),
        sa.Column("input", JSONB),
        sa.Column("params", JSONB),
        sa.Column("error", JSONB),
        sa.Column("prediction_id", sa.String(32)),
    )
    op.create_index(
        "batch_requests_unfed",
        "batch_requests",
        ["batch_id", "line"],
        postgresql_where=sa.text("prediction_id IS NULL AND error IS NULL"),
    )
    op.add_column("predictions", sa.Column("batch_id", sa.String(32)))
    op.create_index(
        "predictions_batch_open",
        "predictions",
        ["tenant_id"],
        postgresql_where=sa.text("batch_id IS NOT NULL AND status IN ('created', 'processing')"),
    )
    op.create_index("predictions_batch", "predictions", ["batch_id"], postgresql_where=sa.text("batch_id IS NOT NULL"))
    op.add_column("files", sa.Column("purpose", sa.String(16)))
    op.add_column("files", sa.Column("filename", sa.Text))
    op.add_column("files", sa.Column("batch_id", sa.String(32)))
    op.add_column("tenants", sa.Column("batch_price_per_image", sa.Numeric(12, 6)))
    op.add_column("usage_records", sa.Column("batch", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("usage_records", "batch")
    op.drop_column("tenants", "batch_price_per_image")
    op.drop_column("files", "batch_id")
    op.drop_column("files", "filename")
    op.drop_column("files", "purpose")
    op.drop_index("predictions_batch", "predictions")
    op.drop_index("predictions_batch_open", "predictions")
    op.drop_column("predictions", "batch_id")
    op.drop_table("batch_requests")
    op.drop_table("batches")

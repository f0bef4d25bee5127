"""data retention: per-tenant retention, expired predictions, the reaper's scans

A finished prediction's objects (outputs and references) are deleted `retention_s` after it finished (the
tenant's, NULL: KLEIN_DEFAULT_RETENTION_S) and its row marked `expired_at`; the row and its usage record stay.
Expired uploaded files go, object and row. Both scans (core/retention.py) read only rows still to reap.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("retention_s", sa.Integer))
    op.add_column("predictions", sa.Column("expired_at", sa.DateTime(timezone=True)))
    op.create_index(
        "predictions_unexpired",
        "predictions",
        ["tenant_id", "completed_at"],
        postgresql_where=sa.text("expired_at IS NULL AND status IN ('completed', 'failed', 'canceled')"),
    )
    op.create_index("files_expires", "files", ["expires_at"])


def downgrade() -> None:
    op.drop_index("files_expires", "files")
    op.drop_index("predictions_unexpired", "predictions")
    op.drop_column("predictions", "expired_at")
    op.drop_column("tenants", "retention_s")

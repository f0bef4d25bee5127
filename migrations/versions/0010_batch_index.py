"""micro-batching (worker/batch.py): a worker's look for queued predictions that can share its pipeline call

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "predictions_batchable",
        "predictions",
        ["model", "priority", "created_at"],
        postgresql_where=sa.text("status = 'created'"),
    )


def downgrade() -> None:
    op.drop_index("predictions_batchable", table_name="predictions")

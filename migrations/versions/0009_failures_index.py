"""the console's recent failures (GET /admin/v1/failures): the failed rows by completion, not the whole table

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "predictions_failed", "predictions", ["completed_at"], postgresql_where=sa.text("status = 'failed'")
    )


def downgrade() -> None:
    op.drop_index("predictions_failed", table_name="predictions")

"""deadlines per prediction (core/deadlines.py, docs/reliability.md)

predictions: `start_deadline_at` (canceled if not started by then) and `deadline_at` (canceled at the next step
if still running then); NULL: none. A partial index for the sweeper's look at queued ones past their deadline.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("start_deadline_at", sa.DateTime(timezone=True)))
    op.add_column("predictions", sa.Column("deadline_at", sa.DateTime(timezone=True)))
    op.create_index(
        "predictions_start_deadline",
        "predictions",
        ["start_deadline_at"],
        postgresql_where=sa.text("status = 'created' AND start_deadline_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("predictions_start_deadline", "predictions")
    op.drop_column("predictions", "deadline_at")
    op.drop_column("predictions", "start_deadline_at")

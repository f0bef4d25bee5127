"""predictions.api_key_id without a foreign key

Every insert's foreign-key check took a KEY SHARE lock on the submitting key's row: concurrent
submissions with one key all locked the same row, which PostgreSQL records as a MultiXact, and the
checks cost about a quarter of the database's CPU per insert (docs/performance.md). The column
records which key submitted; keys are revoked, never deleted, except with their tenant, whose
predictions go with it (tenant_id's cascade), so it cannot dangle.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("predictions_api_key_id_fkey", "predictions", type_="foreignkey")


def downgrade() -> None:
    op.create_foreign_key(
        "predictions_api_key_id_fkey", "predictions", "api_keys", ["api_key_id"], ["id"], ondelete="SET NULL"
    )

"""uploads of LoRA adapters beside images (docs/lora.md): a file's width and height only when it is an image

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("files", "width", nullable=True)
    op.alter_column("files", "height", nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM files WHERE width IS NULL")
    op.alter_column("files", "width", nullable=False)
    op.alter_column("files", "height", nullable=False)

"""stored LoRA adapters, counted per tenant and reaped once unused (docs/lora.md)

`loras`: one row per object `loras/<tenant_id>/<sha256>.safetensors` (each tenant its own copy), with its bytes
(a tenant's sum is bounded by KLEIN_MAX_TENANT_LORA_BYTES) and when a request last named it; the reaper
(core/retention.py) deletes objects, then rows, unused for KLEIN_LORA_RETENTION_S. Objects stored before this
revision have no row and are not reaped: delete `loras/` objects by hand once, or leave them.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "loras",
        sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("loras_last_used", "loras", ["last_used_at"])


def downgrade() -> None:
    op.drop_table("loras")

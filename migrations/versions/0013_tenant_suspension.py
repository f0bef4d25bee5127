"""a tenant can be suspended: `tenants.suspended_at` (NULL: active)

An operator's suspension (POST /admin/v1/tenants/{id}/suspend, `klein suspend`) refuses the tenant's submits
with 403; status reads, in-flight predictions and their webhooks go on (docs/operations.md).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("suspended_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("tenants", "suspended_at")

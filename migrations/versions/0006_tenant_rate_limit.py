"""a request rate for all of a tenant's keys together

Each key had its own per-minute limit, so a tenant multiplied its allowance by creating keys. The
tenant-wide limit is enforced beside the per-key one; NULL means the tenant's per-key limit.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("tenant_rate_limit_per_minute", sa.Integer))


def downgrade() -> None:
    op.drop_column("tenants", "tenant_rate_limit_per_minute")

"""the safety policy per tenant and the check's record per prediction (docs/safety.md)

tenants: `safety_policy` (block, blur or flag; NULL: block), `allow_disable_safety_checker` (NULL: false) and
`blocked_terms` (the tenant's own additions to the operator's prompt blocklist, a JSON array of strings).
predictions: `safety`, what the worker's image checker found (core/safety.py); NULL for rows from before.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("safety_policy", sa.String(8)))
    op.create_check_constraint(
        "tenants_safety_policy_valid", "tenants", "safety_policy IS NULL OR safety_policy IN ('block', 'blur', 'flag')"
    )
    op.add_column("tenants", sa.Column("allow_disable_safety_checker", sa.Boolean))
    op.add_column("tenants", sa.Column("blocked_terms", JSONB))
    op.add_column("predictions", sa.Column("safety", JSONB))
    op.create_index(
        "predictions_flagged",
        "predictions",
        ["completed_at"],
        postgresql_where=sa.text("""safety @> '{"flagged": [true]}'"""),
    )


def downgrade() -> None:
    op.drop_index("predictions_flagged", "predictions")
    op.drop_column("predictions", "safety")
    op.drop_column("tenants", "blocked_terms")
    op.drop_column("tenants", "allow_disable_safety_checker")
    op.drop_constraint("tenants_safety_policy_valid", "tenants")
    op.drop_column("tenants", "safety_policy")

"""events out: webhooks (secrets, deliveries, attempts, the trigger that writes them), priority and logs

Every transition a prediction's webhook asks for becomes a webhook_deliveries row in the transaction that
makes it, whoever makes it (worker, cancel, sweeper): the trigger below is that one place.
`start` is the first claim, `output` a completion, `completed` any final state.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TRIGGER_FUNCTION = """
CREATE FUNCTION klein_webhook_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    wanted jsonb := NEW.webhook -> 'events';
    event text;
BEGIN
    IF OLD.status = NEW.status THEN
        RETURN NULL;
    END IF;
    FOREACH event IN ARRAY ARRAY['start', 'output', 'completed'] LOOP
        CONTINUE WHEN NOT wanted ? event;
        CONTINUE WHEN event = 'start' AND NOT (NEW.status = 'processing' AND NEW.attempts = 1);
        CONTINUE WHEN event = 'output' AND NEW.status <> 'completed';
        CONTINUE WHEN event = 'completed' AND NEW.status NOT IN ('completed', 'failed', 'canceled');
        INSERT INTO webhook_deliveries (id, tenant_id, prediction_id, event, url, snapshot)
        VALUES (
            'msg_' || replace(gen_random_uuid()::text, '-', ''),
            NEW.tenant_id, NEW.id, event, NEW.webhook ->> 'url',
            to_jsonb(NEW) - 'input' - 'params' - 'webhook'
        );
    END LOOP;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.add_column("predictions", sa.Column("webhook", JSONB))
    op.add_column("predictions", sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"))
    op.add_column("predictions", sa.Column("logs", JSONB, nullable=False, server_default="[]"))
    op.create_table(
        "webhook_secrets",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("secret", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("retires_at", sa.DateTime(timezone=True)),
    )
    op.create_index(
        "webhook_secrets_current",
        "webhook_secrets",
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text("retires_at IS NULL"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column(
            "prediction_id", sa.String(32), sa.ForeignKey("predictions.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("snapshot", JSONB, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("kicked_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.clock_timestamp()
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            "status IN ('pending', 'sending', 'delivered', 'failed', 'gone')", name="webhook_deliveries_status_valid"
        ),
    )
    op.create_index(
        "webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("status IN ('pending', 'sending')"),
    )
    op.create_index("webhook_deliveries_tenant_created", "webhook_deliveries", ["tenant_id", "created_at"])
    op.create_index("webhook_deliveries_prediction", "webhook_deliveries", ["prediction_id"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "delivery_id",
            sa.String(40),
            sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("latency_ms", sa.Integer, nullable=False),
        sa.Column("response_head", sa.Text, nullable=False, server_default=""),
        sa.Column("error", sa.Text),
    )
    op.create_index("webhook_attempts_delivery", "webhook_attempts", ["delivery_id"])
    op.execute(TRIGGER_FUNCTION)
    # WHEN is evaluated without entering PL/pgSQL: predictions without a webhook cost nothing.
    op.execute(
        "CREATE TRIGGER predictions_webhook_events AFTER UPDATE OF status ON predictions "
        "FOR EACH ROW WHEN (NEW.webhook IS NOT NULL) EXECUTE FUNCTION klein_webhook_events()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER predictions_webhook_events ON predictions")
    op.execute("DROP FUNCTION klein_webhook_events()")
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_secrets")
    op.drop_column("predictions", "logs")
    op.drop_column("predictions", "priority")
    op.drop_column("predictions", "webhook")

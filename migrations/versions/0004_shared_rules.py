"""Rules shared by every bot process of one database: whose question is running, and conversation generations.

Revision ID: 0004
Revises: 0003
Create Date: 2025-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "active_questions",
        sa.Column("author_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("channel_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "claimed_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("author_id", name=op.f("pk_active_questions")),
    )
    op.create_index(op.f("ix_active_questions_owner"), "active_questions", ["owner"])
    op.create_table(
        "generations",
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("key", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.CheckConstraint("scope IN ('channel', 'author')", name=op.f("ck_generations_scope")),
        sa.PrimaryKeyConstraint("scope", "key", name=op.f("pk_generations")),
    )


def downgrade() -> None:
    op.drop_table("generations")
    op.drop_index(op.f("ix_active_questions_owner"), table_name="active_questions")
    op.drop_table("active_questions")

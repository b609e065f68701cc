"""Which process writes each open reply, and until when it counts as alive, so that a start closes only the
replies of processes that have ended.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A batch migration that rebuilds the table on SQLite must keep AUTOINCREMENT, or ids could be reused.
_TABLE_KWARGS = {"sqlite_autoincrement": True}


def upgrade() -> None:
    # Rows written before this revision get no owner: no live process claims them, so they count as left over.
    with op.batch_alter_table("open_replies", table_kwargs=_TABLE_KWARGS) as batch:
        batch.add_column(sa.Column("owner", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index(batch.f("ix_open_replies_owner"), ["owner"])


def downgrade() -> None:
    with op.batch_alter_table("open_replies", table_kwargs=_TABLE_KWARGS) as batch:
        batch.drop_index(batch.f("ix_open_replies_owner"))
        batch.drop_column("expires_at")
        batch.drop_column("owner")

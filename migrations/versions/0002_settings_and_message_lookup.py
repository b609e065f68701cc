"""Settings, a lookup from Discord message to turn, and indexes for the common queries.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-26
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Lightweight table views for the data step; the ORM models follow the head schema and may drift.
turns = sa.table("turns", sa.column("id", sa.Integer()), sa.column("message_ids", sa.JSON()))
turn_messages = sa.table(
    "turn_messages", sa.column("message_id", sa.BigInteger()), sa.column("turn_id", sa.Integer())
)


def upgrade() -> None:
    op.create_table(
        "settings",
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_settings")),
    )
    op.create_table(
        "turn_messages",
        sa.Column("message_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("turn_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["turn_id"], ["turns.id"], name=op.f("fk_turn_messages_turn_id_turns"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_turn_messages")),
    )
    op.create_index(op.f("ix_turn_messages_turn_id"), "turn_messages", ["turn_id"])

    # (channel_id, id) answers "the latest N turns of a channel" straight from the index, and makes the
    # single-column index redundant.
    op.create_index(op.f("ix_turns_channel_id_id"), "turns", ["channel_id", "id"])
    op.drop_index(op.f("ix_turns_channel_id"), table_name="turns")
    # Garbage-collecting images asks "is any turn still using this image?".
    op.create_index(op.f("ix_turns_image_sha256"), "turns", ["image_sha256"])

    _index_existing_message_ids()


def _index_existing_message_ids() -> None:
    """Fill turn_messages from the message_ids of turns stored before this revision."""
    if op.get_context().as_sql:
        # Offline SQL cannot read the rows it would have to copy.
        return
    bind = op.get_bind()
    owner: dict[int, int] = {}
    for turn_id, message_ids in bind.execute(sa.select(turns.c.id, turns.c.message_ids).order_by(turns.c.id)):
        ids = json.loads(message_ids) if isinstance(message_ids, str) else message_ids
        for message_id in ids or ():
            # A message can belong to one turn only; should old data disagree, the newest turn wins.
            owner[int(message_id)] = turn_id
    if owner:
        op.bulk_insert(
            turn_messages, [{"message_id": message, "turn_id": turn} for message, turn in owner.items()]
        )


def downgrade() -> None:
    op.drop_index(op.f("ix_turns_image_sha256"), table_name="turns")
    op.create_index(op.f("ix_turns_channel_id"), "turns", ["channel_id"])
    op.drop_index(op.f("ix_turns_channel_id_id"), table_name="turns")
    op.drop_index(op.f("ix_turn_messages_turn_id"), table_name="turn_messages")
    op.drop_table("turn_messages")
    op.drop_table("settings")

"""Replies in progress: recorded while the bot writes them, removed when they are closed.

Whatever is left at start was being written when the previous process died; the bot closes those replies
on Discord and then here. Each method is one unit of work in its own session and transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.store.tables import OpenReplyRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Interaction:
    """The webhook of an interaction, through which its response can be edited while the token lives."""

    application_id: int
    token: str


@dataclass(frozen=True)
class StoredReply:
    """A reply that was being written: where its messages are."""

    id: int
    channel_id: int
    message_ids: tuple[int, ...]
    interaction: Interaction | None
    created_at: datetime


def _ids(message_ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(int(message_id) for message_id in message_ids))


class ReplyStore:
    """Open replies, safe to share between all channels of one process."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def open(self, channel_id: int, message_ids: Sequence[int], *, interaction: Interaction | None = None) -> int:
        """Record a reply that has just been posted and return its id."""
        row = OpenReplyRow(
            channel_id=channel_id,
            message_ids=_ids(message_ids),
            application_id=interaction.application_id if interaction else None,
            interaction_token=interaction.token if interaction else None,
        )
        async with self._sessions() as session, session.begin():
            session.add(row)
            await session.flush()
            return row.id

    async def set_message_ids(self, reply_id: int, message_ids: Sequence[int]) -> None:
        """The reply grew into another message: remember all of them, in order."""
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(OpenReplyRow)
                .where(OpenReplyRow.id == reply_id)
                .values(message_ids=_ids(message_ids))
                .execution_options(synchronize_session=False)
            )

    async def close(self, reply_id: int) -> None:
        """The reply has ended (finished, failed, stopped or interrupted); forget it."""
        async with self._sessions() as session, session.begin():
            await session.execute(
                delete(OpenReplyRow).where(OpenReplyRow.id == reply_id).execution_options(synchronize_session=False)
            )

    async def open_replies(self) -> list[StoredReply]:
        """Every reply not closed yet, oldest first."""
        async with self._sessions() as session:
            rows = (await session.scalars(select(OpenReplyRow).order_by(OpenReplyRow.id))).all()
        return [
            StoredReply(
                id=row.id,
                channel_id=row.channel_id,
                message_ids=tuple(int(message_id) for message_id in row.message_ids),
                interaction=(
                    Interaction(row.application_id, row.interaction_token)
                    if row.application_id is not None and row.interaction_token
                    else None
                ),
                created_at=row.created_at,
            )
            for row in rows
        ]

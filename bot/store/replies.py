"""Replies in progress: recorded while the bot writes them, removed when they are closed.

Each reply belongs to the process writing it (its :func:`~bot.store.shared.process_name`), which keeps the
reply's expiry ahead of the clock while it lives, as it does for the questions it claims. Whatever is left
over once its process has ended was cut off mid-answer; another process of the same database, or the next
start, takes it over (:meth:`ReplyStore.adopt`) and closes it on Discord and then here. Each method is one
unit of work in its own session and transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.store.db import rowcount
from bot.store.shared import QUESTION_TTL, ended_here, process_name
from bot.store.tables import OpenReplyRow, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Interaction:
    """The webhook of an interaction, through which its response can be edited while the token lives."""

    application_id: int
    token: str


@dataclass(frozen=True)
class StoredReply:
    """A reply that was being written: where its messages are, and which process was writing it."""

    id: int
    channel_id: int
    message_ids: tuple[int, ...]
    interaction: Interaction | None
    created_at: datetime
    owner: str | None = None
    expires_at: datetime | None = None


def abandoned(reply: StoredReply, now: datetime) -> bool:
    """Whether the process that was writing ``reply`` has ended, so that someone else must close it.

    A process of this host is known to have ended once its pid is gone; one of another host once it has
    stopped pushing the reply's expiry forward. A reply from before owners were recorded has none.
    """
    if reply.owner is None or reply.expires_at is None:
        return True
    return reply.expires_at <= now or ended_here(reply.owner)


def _ids(message_ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(int(message_id) for message_id in message_ids))


def _stored(row: OpenReplyRow) -> StoredReply:
    return StoredReply(
        id=row.id,
        channel_id=row.channel_id,
        message_ids=tuple(int(message_id) for message_id in row.message_ids),
        interaction=(
            Interaction(row.application_id, row.interaction_token)
            if row.application_id is not None and row.interaction_token
            else None
        ),
        created_at=row.created_at,
        owner=row.owner,
        expires_at=row.expires_at,
    )


class ReplyStore:
    """Open replies of the process named ``owner``, safe to share between all its channels."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], owner: str | None = None) -> None:
        self._sessions = sessions
        self.owner = owner or process_name()

    async def open(
        self,
        channel_id: int,
        message_ids: Sequence[int],
        *,
        interaction: Interaction | None = None,
        ttl: float = QUESTION_TTL,
    ) -> int:
        """Record a reply that has just been posted and return its id."""
        row = OpenReplyRow(
            channel_id=channel_id,
            message_ids=_ids(message_ids),
            application_id=interaction.application_id if interaction else None,
            interaction_token=interaction.token if interaction else None,
            owner=self.owner,
            expires_at=utcnow() + timedelta(seconds=ttl),
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

    async def refresh(self, *, ttl: float = QUESTION_TTL) -> int:
        """Push the expiry of this process's open replies ``ttl`` seconds ahead; returns how many it has."""
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(OpenReplyRow)
                .where(OpenReplyRow.owner == self.owner)
                .values(expires_at=utcnow() + timedelta(seconds=ttl))
                .execution_options(synchronize_session=False)
            )
            return rowcount(result)

    async def open_replies(self) -> list[StoredReply]:
        """Every reply not closed yet, whichever process writes it, oldest first."""
        async with self._sessions() as session:
            rows = (await session.scalars(select(OpenReplyRow).order_by(OpenReplyRow.id))).all()
        return [_stored(row) for row in rows]

    async def of_others(self) -> list[StoredReply]:
        """The replies not closed yet that other processes write or wrote (judge them with :func:`abandoned`)."""
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(OpenReplyRow)
                    .where(or_(OpenReplyRow.owner.is_(None), OpenReplyRow.owner != self.owner))
                    .order_by(OpenReplyRow.id)
                )
            ).all()
        return [_stored(row) for row in rows]

    async def adopt(self, reply: StoredReply, *, ttl: float = QUESTION_TTL) -> bool:
        """Make an abandoned reply this process's to close; ``False`` if it changed hands or was refreshed since
        ``reply`` was read (another survivor took it, or its process turned out to be alive)."""
        row = OpenReplyRow
        unchanged = [
            row.id == reply.id,
            row.owner.is_(None) if reply.owner is None else row.owner == reply.owner,
            row.expires_at.is_(None) if reply.expires_at is None else row.expires_at == reply.expires_at,
        ]
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(row)
                .where(*unchanged)
                .values(owner=self.owner, expires_at=utcnow() + timedelta(seconds=ttl))
                .execution_options(synchronize_session=False)
            )
            adopted = rowcount(result) == 1
        if adopted:
            log.info(
                "Took over reply %s in channel %s from %s",
                reply.id,
                reply.channel_id,
                reply.owner or "an earlier version",
            )
        return adopted

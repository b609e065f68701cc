"""Rules that hold across every bot process sharing one database (PostgreSQL, or one SQLite file).

* One question per person at a time: admitting a question claims the person's row in
  ``active_questions`` (its primary key is the person), and ending it, however it ends, releases the row.
  The owning process pushes the row's expiry forward while it lives (:meth:`SharedRules.refresh`), so the
  rows of a process that crashed lapse after ``ttl`` seconds instead of locking people out for ever.
* ``/reset`` and ``/forget`` seen everywhere: each bumps a generation number of the channel or the person
  (``generations``). An answer is stored only if both numbers it started under are still current, checked
  under a lock on those rows in the transaction that stores it (:meth:`SharedRules.add_answer_if_current`).

Each method is one unit of work in its own session and transaction.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.store.db import rowcount
from bot.store.history import HistoryStore
from bot.store.tables import ActiveQuestionRow, GenerationRow, TurnRow, utcnow

log = logging.getLogger(__name__)

# How long a claimed question outlives its process's last sign of life. Long enough to ride out a slow
# database; short enough that a crash costs a person at most this wait.
QUESTION_TTL = 90.0

CHANNEL = "channel"
AUTHOR = "author"


def process_name() -> str:
    """A name for this process that no other process, here or on another host, shares."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def ended_here(owner: str) -> bool:
    """Whether ``owner`` (a :func:`process_name`) was a process of this host that has since ended."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's processes can only be judged by their claims expiring
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists, under another user
    # The pid is in use: by that process, or by a newer one that reused it; the claims' expiry decides.
    return False


@dataclass(frozen=True)
class Generations:
    """The reset count of a channel and the /forget count of a person when an answer began."""

    channel: int
    author: int


def _insert(session: AsyncSession) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"shared rules need PostgreSQL or SQLite, not {dialect}")


class SharedRules:
    """Person locks and conversation generations in the database, for one bot process named ``owner``."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], owner: str | None = None) -> None:
        self._sessions = sessions
        self.owner = owner or process_name()

    # --- one question per person -------------------------------------------------------------------
    async def claim(self, author_id: int, channel_id: int, *, ttl: float = QUESTION_TTL) -> bool:
        """Claim the person's one running question for this process; ``False`` if someone holds it.

        A claim that has expired (its process died) is taken over.
        """
        now = utcnow()
        async with self._sessions() as session, session.begin():
            # The write comes first so that on SQLite the check below already runs under the write lock.
            await session.execute(
                delete(ActiveQuestionRow)
                .where(ActiveQuestionRow.author_id == author_id, ActiveQuestionRow.expires_at <= now)
                .execution_options(synchronize_session=False)
            )
            insert = _insert(session)(ActiveQuestionRow).values(
                author_id=author_id,
                owner=self.owner,
                channel_id=channel_id,
                claimed_at=now,
                expires_at=now + timedelta(seconds=ttl),
            )
            # One statement: two processes claiming at once cannot both see the row missing and insert.
            result = await session.execute(insert.on_conflict_do_nothing(index_elements=[ActiveQuestionRow.author_id]))
            claimed = rowcount(result) == 1
        if not claimed:
            log.info("User %s already has a question running (seen from %s)", author_id, self.owner)
        return claimed

    async def release(self, author_id: int) -> None:
        """End this process's claim on the person's question (a claim of another process stays)."""
        async with self._sessions() as session, session.begin():
            await session.execute(
                delete(ActiveQuestionRow)
                .where(ActiveQuestionRow.author_id == author_id, ActiveQuestionRow.owner == self.owner)
                .execution_options(synchronize_session=False)
            )

    async def refresh(self, *, ttl: float = QUESTION_TTL) -> int:
        """Push the expiry of this process's claims ``ttl`` seconds ahead; returns how many it holds."""
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(ActiveQuestionRow)
                .where(ActiveQuestionRow.owner == self.owner)
                .values(expires_at=utcnow() + timedelta(seconds=ttl))
                .execution_options(synchronize_session=False)
            )
            return rowcount(result)

    async def clear_expired(self, now: datetime | None = None) -> int:
        """Remove the claims of processes that stopped refreshing them, and at once those of processes on
        this host that no longer run (a crash and a quick restart must not lock people out until the claims
        expire); returns how many."""
        async with self._sessions() as session, session.begin():
            owners = set(await session.scalars(select(ActiveQuestionRow.owner).distinct()))
            dead = [owner for owner in owners if owner != self.owner and ended_here(owner)]
            stale = ActiveQuestionRow.expires_at <= (now or utcnow())
            result = await session.execute(
                delete(ActiveQuestionRow)
                .where(or_(stale, ActiveQuestionRow.owner.in_(dead)) if dead else stale)
                .execution_options(synchronize_session=False)
            )
            cleared = rowcount(result)
        if cleared:
            log.info("Cleared %d questions left running by processes that ended", cleared)
        return cleared

    async def holder(self, author_id: int) -> str | None:
        """Which process holds the person's question, if any (expired claims included)."""
        async with self._sessions() as session:
            return await session.scalar(select(ActiveQuestionRow.owner).where(ActiveQuestionRow.author_id == author_id))

    # --- /reset and /forget ------------------------------------------------------------------------
    async def current(self, channel_id: int, author_id: int) -> Generations:
        """The generations an answer starting now in ``channel_id`` for ``author_id`` runs under."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(GenerationRow.scope, GenerationRow.value).where(
                    ((GenerationRow.scope == CHANNEL) & (GenerationRow.key == channel_id))
                    | ((GenerationRow.scope == AUTHOR) & (GenerationRow.key == author_id))
                )
            )
            values = {scope: value for scope, value in rows}
        return Generations(values.get(CHANNEL, 0), values.get(AUTHOR, 0))

    async def bump_channel(self, channel_id: int) -> int:
        """A /reset of the channel: answers begun before it are no longer stored. Returns the new number."""
        return await self._bump(CHANNEL, channel_id)

    async def bump_author(self, author_id: int) -> int:
        """A /forget by the person: their answers begun before it are no longer stored."""
        return await self._bump(AUTHOR, author_id)

    async def add_answer_if_current(
        self, channel_id: int, author_id: int, since: Generations, text: str, *, message_ids: Sequence[int] = ()
    ) -> int | None:
        """Store the answer turn unless the channel was reset or the person used /forget since ``since``.

        Returns the turn's id, or ``None`` when it was not stored. The generation rows stay locked until
        the answer is committed, so a /reset or /forget either waits for the answer and then removes it, or
        comes first and keeps it from being stored.
        """
        async with self._sessions() as session, session.begin():
            # Channel before person, in every transaction, so two of them never wait on each other.
            channel = await self._lock(session, CHANNEL, channel_id)
            author = await self._lock(session, AUTHOR, author_id)
            if (channel, author) != (since.channel, since.author):
                return None
            return await HistoryStore.add_turn_in(
                session, TurnRow(channel_id=channel_id, role="assistant", text=text), message_ids
            )

    async def _bump(self, scope: str, key: int) -> int:
        async with self._sessions() as session, session.begin():
            insert = _insert(session)(GenerationRow).values(scope=scope, key=key, value=1)
            upsert = insert.on_conflict_do_update(
                index_elements=[GenerationRow.scope, GenerationRow.key], set_={"value": GenerationRow.value + 1}
            ).returning(GenerationRow.value)
            return int((await session.execute(upsert)).scalar_one())

    @staticmethod
    async def _lock(session: AsyncSession, scope: str, key: int) -> int:
        """The generation's value, its row locked (and created at 0 if missing) until the transaction ends."""
        # Writing the row (even to its own value) takes the row lock on PostgreSQL and the write lock on
        # SQLite, which a plain SELECT would not.
        insert = _insert(session)(GenerationRow).values(scope=scope, key=key, value=0)
        upsert = insert.on_conflict_do_update(
            index_elements=[GenerationRow.scope, GenerationRow.key], set_={"value": GenerationRow.value}
        ).returning(GenerationRow.value)
        return int((await session.execute(upsert)).scalar_one())

"""Each channel's conversation: turns, the images they refer to, and bot-wide settings.

Everything returned is plain frozen data, so callers never hold ORM objects bound to a closed session.
Each method is one unit of work in its own session and transaction.

On SQLite, a transaction only starts at its first write (see :func:`bot.store.db.open_database`).
Methods that read in order to decide what to write therefore write first, so the read happens inside the
transaction, under the write lock, and cannot be invalidated by another channel's commit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from datetime import datetime
from typing import cast

from sqlalchemy import delete, exists, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.engine.base import ImageRef, Role
from bot.store import privacy
from bot.store.db import rowcount
from bot.store.privacy import Removed
from bot.store.tables import ImageRow, SettingRow, TurnMessageRow, TurnRow, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredImage:
    """A normalised image as the store keeps it, under the SHA-256 (hex) of ``data``.

    Built from bytes, the key is derived from them here. Built from an :class:`~bot.engine.base.ImageRef`
    (:meth:`from_ref`), it is the digest the reference took when the bytes arrived, not computed again.
    """

    data: bytes = field(repr=False)
    mime: str
    width: int
    height: int
    sha256: str = field(init=False)
    # The digest already known for ``data``; only :meth:`from_ref` passes it.
    _known_sha256: InitVar[str | None] = None

    def __post_init__(self, _known_sha256: str | None) -> None:
        digest = _known_sha256 or hashlib.sha256(self.data).hexdigest()
        object.__setattr__(self, "sha256", digest)

    @classmethod
    def from_ref(cls, ref: ImageRef) -> StoredImage:
        """The stored form of an image the chat layer took in (and hashed) already."""
        return cls(ref.data, ref.mime, ref.width, ref.height, ref.sha256)


@dataclass(frozen=True)
class StoredTurn:
    """One stored message of a channel's conversation."""

    id: int
    role: Role
    text: str
    author_id: int | None
    author_name: str | None
    image_sha256: str | None
    # For a user turn the message that asked; for an assistant turn the reply messages, in order.
    message_ids: tuple[int, ...]
    created_at: datetime


def _stored(turn: TurnRow) -> StoredTurn:
    return StoredTurn(
        id=turn.id,
        role=cast(Role, turn.role),
        text=turn.text,
        author_id=turn.author_id,
        author_name=turn.author_name,
        image_sha256=turn.image_sha256,
        message_ids=tuple(int(message_id) for message_id in turn.message_ids),
        created_at=turn.created_at,
    )


def _unique(message_ids: Sequence[int]) -> list[int]:
    # Order matters (a long answer spans several messages), duplicates don't.
    return list(dict.fromkeys(int(message_id) for message_id in message_ids))


def _upsert(session: AsyncSession, model: type[ImageRow | SettingRow]) -> sqlite.Insert | postgresql.Insert | None:
    """An INSERT that can resolve key conflicts itself, on the backends that spell it the same way."""
    match session.get_bind().dialect.name:
        case "sqlite":
            return sqlite.insert(model)
        case "postgresql":
            return postgresql.insert(model)
        case _:
            return None


class HistoryStore:
    """The conversation store, safe to share between all channels of one process."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def add_user_turn(
        self,
        channel_id: int,
        text: str,
        *,
        author_id: int | None,
        author_name: str | None,
        image: StoredImage | None = None,
        message_ids: Sequence[int] = (),
    ) -> int:
        """Append the person's question, with the image it asks about, and return the turn's id.

        The image is stored in the same transaction as the turn, so a concurrent :meth:`reset` elsewhere
        cannot garbage-collect it in between.
        """
        async with self._sessions() as session, session.begin():
            if image is not None:
                await self._insert_image(session, image)
            return await self._add_turn(
                session,
                TurnRow(
                    channel_id=channel_id,
                    role="user",
                    author_id=author_id,
                    author_name=author_name,
                    text=text,
                    image_sha256=image.sha256 if image is not None else None,
                ),
                message_ids,
            )

    async def add_assistant_turn(self, channel_id: int, text: str, *, message_ids: Sequence[int] = ()) -> int:
        """Append the bot's answer and return the turn's id."""
        async with self._sessions() as session, session.begin():
            return await self._add_turn(
                session, TurnRow(channel_id=channel_id, role="assistant", text=text), message_ids
            )

    async def set_message_ids(self, turn_id: int, message_ids: Sequence[int]) -> bool:
        """Replace the Discord messages of a turn, e.g. once a long answer has been split.

        Returns ``False`` if the turn no longer exists (its channel was reset meanwhile).
        """
        ids = _unique(message_ids)
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(TurnRow)
                .where(TurnRow.id == turn_id)
                .values(message_ids=ids)
                .execution_options(synchronize_session=False)
            )
            if rowcount(result) == 0:
                return False
            await self._index_messages(session, turn_id, ids, replace=True)
        return True

    async def turns(self, channel_id: int, limit: int | None = None) -> list[StoredTurn]:
        """The channel's turns, oldest first; with ``limit``, only the most recent ``limit`` of them."""
        if limit is not None and limit <= 0:
            return []
        query = select(TurnRow).where(TurnRow.channel_id == channel_id).order_by(TurnRow.id.desc())
        if limit is not None:
            query = query.limit(limit)
        async with self._sessions() as session:
            rows = (await session.scalars(query)).all()
        return [_stored(turn) for turn in reversed(rows)]

    async def find_turn_by_message(self, message_id: int) -> StoredTurn | None:
        """The turn a Discord message belongs to, or ``None`` if it is not part of any conversation.

        This is how a reply to one of the bot's answers is recognised.
        """
        query = select(TurnRow).join(TurnMessageRow, TurnMessageRow.turn_id == TurnRow.id)
        async with self._sessions() as session:
            turn = await session.scalar(query.where(TurnMessageRow.message_id == message_id))
        return _stored(turn) if turn is not None else None

    async def reset(self, channel_id: int) -> int:
        """Forget the channel's conversation and return how many turns were removed.

        Images that no turn refers to any more are deleted with it.
        """
        channel_turns = select(TurnRow.id).where(TurnRow.channel_id == channel_id)
        async with self._sessions() as session, session.begin():
            # Written first, so the image query below already runs under the write lock.
            await session.execute(
                delete(TurnMessageRow)
                .where(TurnMessageRow.turn_id.in_(channel_turns))
                .execution_options(synchronize_session=False)
            )
            images = set(
                await session.scalars(
                    select(TurnRow.image_sha256)
                    .where(TurnRow.channel_id == channel_id, TurnRow.image_sha256.is_not(None))
                    .distinct()
                )
            )
            removed = rowcount(
                await session.execute(
                    delete(TurnRow).where(TurnRow.channel_id == channel_id).execution_options(synchronize_session=False)
                )
            )
            collected = 0
            if images:
                still_used = exists().where(TurnRow.image_sha256 == ImageRow.sha256)
                collected = rowcount(
                    await session.execute(
                        delete(ImageRow)
                        .where(ImageRow.sha256.in_(images), ~still_used)
                        .execution_options(synchronize_session=False)
                    )
                )
        log.info("Reset channel %s: %d turns and %d images removed", channel_id, removed, collected)
        return removed

    async def forget_author(self, author_id: int) -> Removed:
        """Delete everything one person stored, in every channel (see :func:`bot.store.privacy.forget_author`)."""
        return await privacy.forget_author(self._sessions, author_id)

    async def delete_older_than(self, cutoff: datetime) -> Removed:
        """Delete turns and images stored before ``cutoff`` (see :func:`bot.store.privacy.delete_older_than`)."""
        return await privacy.delete_older_than(self._sessions, cutoff)

    async def delete_turns(self, turn_ids: Sequence[int]) -> tuple[int, list[str]]:
        """Delete these turns and their message links; images no other turn uses go with them.

        Returns how many turns were removed and the SHA-256 of every image deleted. Ids of turns that
        no longer exist are ignored.
        """
        ids = list(dict.fromkeys(int(turn_id) for turn_id in turn_ids))
        if not ids:
            return 0, []
        async with self._sessions() as session, session.begin():
            # Written first, so the image query below already runs under the write lock.
            await session.execute(
                delete(TurnMessageRow)
                .where(TurnMessageRow.turn_id.in_(ids))
                .execution_options(synchronize_session=False)
            )
            images = set(
                await session.scalars(
                    select(TurnRow.image_sha256)
                    .where(TurnRow.id.in_(ids), TurnRow.image_sha256.is_not(None))
                    .distinct()
                )
            )
            removed = rowcount(
                await session.execute(
                    delete(TurnRow).where(TurnRow.id.in_(ids)).execution_options(synchronize_session=False)
                )
            )
            collected: list[str] = []
            if images:
                still_used = exists().where(TurnRow.image_sha256 == ImageRow.sha256)
                orphans = select(ImageRow.sha256).where(ImageRow.sha256.in_(images), ~still_used)
                collected = list(await session.scalars(orphans))
                await session.execute(
                    delete(ImageRow).where(ImageRow.sha256.in_(collected)).execution_options(synchronize_session=False)
                )
        log.info("Deleted %d turns and %d images", removed, len(collected))
        return removed, collected

    async def adjacent_turns(self, turn_id: int) -> tuple[StoredTurn | None, StoredTurn | None]:
        """The turns just before and just after ``turn_id`` in its channel (``None`` where there is none)."""
        async with self._sessions() as session:
            turn = await session.get(TurnRow, turn_id)
            if turn is None:
                return None, None
            same_channel = select(TurnRow).where(TurnRow.channel_id == turn.channel_id)
            before = await session.scalar(same_channel.where(TurnRow.id < turn_id).order_by(TurnRow.id.desc()).limit(1))
            after = await session.scalar(same_channel.where(TurnRow.id > turn_id).order_by(TurnRow.id).limit(1))
        return (_stored(before) if before else None), (_stored(after) if after else None)

    async def put_image(self, data: bytes, mime: str, width: int, height: int) -> str:
        """Store normalised image bytes unless already present, and return their SHA-256 (hex)."""
        image = StoredImage(data=data, mime=mime, width=width, height=height)
        async with self._sessions() as session, session.begin():
            await self._insert_image(session, image)
        return image.sha256

    async def image_bytes(self, sha256: str) -> bytes | None:
        """The stored bytes of an image, or ``None`` if there is no such image."""
        async with self._sessions() as session:
            return await session.scalar(select(ImageRow.data).where(ImageRow.sha256 == sha256))

    async def get_setting(self, key: str) -> str | None:
        """A bot-wide setting, or ``None`` if it was never set."""
        async with self._sessions() as session:
            return await session.scalar(select(SettingRow.value).where(SettingRow.key == key))

    async def set_setting(self, key: str, value: str) -> None:
        """Set a bot-wide setting, replacing any previous value."""
        async with self._sessions() as session, session.begin():
            upsert = _upsert(session, SettingRow)
            if upsert is not None:
                upsert = upsert.values(key=key, value=value, updated_at=utcnow())
                await session.execute(
                    upsert.on_conflict_do_update(
                        index_elements=[SettingRow.key],
                        set_={"value": upsert.excluded.value, "updated_at": upsert.excluded.updated_at},
                    )
                )
                return
            changed = update(SettingRow).where(SettingRow.key == key).values(value=value, updated_at=utcnow())
            if rowcount(await session.execute(changed)) == 0:
                try:
                    async with session.begin_nested():
                        await session.execute(insert(SettingRow).values(key=key, value=value))
                except IntegrityError:
                    # Another writer inserted the key first; ours is the later value.
                    await session.execute(changed)

    async def _add_turn(self, session: AsyncSession, turn: TurnRow, message_ids: Sequence[int]) -> int:
        return await self.add_turn_in(session, turn, message_ids)

    @classmethod
    async def add_turn_in(cls, session: AsyncSession, turn: TurnRow, message_ids: Sequence[int]) -> int:
        """Add ``turn`` and its message links inside the caller's transaction; returns the turn's id."""
        ids = _unique(message_ids)
        turn.message_ids = ids
        session.add(turn)
        await session.flush()
        await cls._index_messages(session, turn.id, ids, replace=False)
        return turn.id

    @staticmethod
    async def _index_messages(session: AsyncSession, turn_id: int, message_ids: list[int], *, replace: bool) -> None:
        if not message_ids and not replace:
            return
        owned = TurnMessageRow.message_id.in_(message_ids)
        # A message belongs to one turn; should a caller hand the same id to a second turn, the newest
        # claim wins rather than the write failing.
        stale = or_(TurnMessageRow.turn_id == turn_id, owned) if replace else owned
        await session.execute(delete(TurnMessageRow).where(stale).execution_options(synchronize_session=False))
        if message_ids:
            await session.execute(
                insert(TurnMessageRow),
                [{"message_id": message_id, "turn_id": turn_id} for message_id in message_ids],
            )

    @staticmethod
    async def _insert_image(session: AsyncSession, image: StoredImage) -> None:
        values = {
            "sha256": image.sha256,
            "data": image.data,
            "mime": image.mime,
            "width": image.width,
            "height": image.height,
        }
        upsert = _upsert(session, ImageRow)
        if upsert is not None:
            # One statement, so concurrent writers of the same picture cannot both decide to insert it.
            await session.execute(upsert.values(**values).on_conflict_do_nothing(index_elements=[ImageRow.sha256]))
            return
        if await session.scalar(select(ImageRow.sha256).where(ImageRow.sha256 == image.sha256)) is not None:
            return
        try:
            async with session.begin_nested():
                await session.execute(insert(ImageRow).values(**values))
        except IntegrityError:
            log.debug("Image %s was stored concurrently", image.sha256)

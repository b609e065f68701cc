"""Replies from start to end: on record while they are written, given time to finish when the bot stops.

A reply is recorded in the database when its first message is posted and forgotten once it has ended, so
that a start after a crash knows which messages were left half-written (see ``bot/cogs/recovery.py``). On
SIGTERM or SIGINT the bot stops taking questions, lets the answers in progress finish within a grace
period and then cuts the rest short, each with a sentence for the person.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Generic, Protocol, TypeVar

from bot.chat.streaming import MessageSink
from bot.store.replies import Interaction, ReplyStore

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
RESTARTING = "I'm restarting; please ask again in a minute."


class _Identified(Protocol):
    @property
    def id(self) -> int: ...


M = TypeVar("M", bound=_Identified)


class TrackedSink(Generic[M]):
    """A :class:`MessageSink` that keeps the reply's messages on record until :meth:`close`.

    A posted message is handed back at once and recorded in the background: the answer must be findable by
    its reply (a Stop pressed the moment the reply appears) before any database write. :meth:`close` waits
    for the writes still under way. Bookkeeping never costs the person their answer: a failed write is
    logged and the reply goes on.
    """

    def __init__(
        self, sink: MessageSink[M], replies: ReplyStore, channel_id: int, *, interaction: Interaction | None = None
    ) -> None:
        self._sink = sink
        self._replies = replies
        self._channel_id = channel_id
        self._interaction = interaction
        self._message_ids: list[int] = []
        self._reply_id: int | None = None
        self._closed = False
        self._recorded = 0  # how many of the messages are on record
        self._writer: asyncio.Task[None] | None = None

    async def send(self, content: str, *, live: bool) -> M:
        """Post a message of the reply; it goes on record in the background."""
        message = await self._sink.send(content, live=live)
        self._message_ids.append(int(message.id))
        if not self._closed and (self._writer is None or self._writer.done()):
            # One writer at a time, which catches up with every message posted meanwhile.
            self._writer = asyncio.create_task(self._record(), name=f"record-reply-{self._channel_id}")
        return message

    async def edit(self, handle: M, content: str, *, live: bool) -> None:
        """Show a message's latest text."""
        await self._sink.edit(handle, content, live=live)

    async def flush(self) -> None:
        """Wait until the messages posted so far are on record (or failed to be)."""
        if self._writer is not None:
            await asyncio.shield(self._writer)

    async def close(self) -> None:
        """The reply has ended, however it ended: take it off the record once its writes are done."""
        self._closed = True
        await self.flush()
        if self._reply_id is None:
            return
        reply_id, self._reply_id = self._reply_id, None
        try:
            await self._replies.close(reply_id)
        except Exception:
            log.exception("Could not mark the reply in channel %s as closed", self._channel_id)

    async def _record(self) -> None:
        try:
            while self._recorded < len(self._message_ids):
                ids = list(self._message_ids)
                if self._reply_id is None:
                    self._reply_id = await self._replies.open(self._channel_id, ids, interaction=self._interaction)
                else:
                    await self._replies.set_message_ids(self._reply_id, ids)
                self._recorded = len(ids)
        except Exception:
            log.exception(
                "Could not record the reply in channel %s; a crash now would leave it unfinished", self._channel_id
            )


class AnswerTasks:
    """The answers in progress, so that a shutdown can wait for them and then cut them short."""

    def __init__(self) -> None:
        self.accepting = True
        self._tasks: set[asyncio.Task[object]] = set()

    def add(self, task: asyncio.Task[object]) -> None:
        """Count ``task`` (one question from arrival to its reply's end) as an answer in progress."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def __len__(self) -> int:
        return sum(1 for task in self._tasks if not task.done())

    async def drain(self, grace: float, cut_short: asyncio.Event) -> int:
        """Stop accepting, wait up to ``grace`` seconds (or until ``cut_short``), then cancel what is left.

        Returns how many answers had to be cancelled. Cancelled answers end their replies themselves.
        """
        self.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        interrupt = loop.create_task(cut_short.wait())
        try:
            while (pending := {t for t in self._tasks if not t.done()}) and not cut_short.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait(pending | {interrupt}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupt.cancel()
        left = [task for task in self._tasks if not task.done()]
        for task in left:
            task.cancel()
        # Each cancelled answer writes its closing sentence before it ends; wait for those edits.
        results = await asyncio.gather(*left, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("An answer failed while being cut short", exc_info=result)
        return len(left)

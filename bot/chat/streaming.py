"""The reply streamer: shows an answer growing in place, one throttled message edit at a time.

It knows nothing about Discord; a :class:`MessageSink` (the chat cog) turns its calls into messages.
Where a long answer is split into messages is decided by :mod:`bot.chat.splitting`; this module decides
when each message is written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from bot.chat.splitting import find_cut

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
EMPTY_ANSWER = "(no answer)"
FAILURE_LINE = "\n\n⚠️ {sentence}"
FAILED_WITHOUT_REASON = "Something went wrong while answering."
BLANK_STATUS = "…"
DEFAULT_MARKER = " ▌"

H = TypeVar("H")


class MessageGone(Exception):
    """Raised by a sink when the message to edit no longer exists (someone deleted it).

    Unlike other failures it is not retried: the streamer never writes to that message again.
    """


class MessageSink(Protocol[H]):
    """Where the streamer's messages go. Both calls may raise; the streamer retries what matters.

    ``live`` is true while the message will still change (a placeholder, or text still growing) and
    false for its last write, so a sink can show controls (a Stop button) only while they are useful.
    """

    async def send(self, content: str, *, live: bool) -> H:
        """Post a new message with ``content`` and return a handle for editing it."""
        ...

    async def edit(self, handle: H, content: str, *, live: bool) -> None:
        """Replace the content of a message created by :meth:`send`; may raise :class:`MessageGone`."""
        ...


class ReplyStreamer(Generic[H]):
    """Streams one answer into one or more messages through a :class:`MessageSink`.

    Typical use: ``await start("⏳ Queued…")``, ``await status(...)`` while waiting, ``feed(piece)`` for
    every piece of text, then ``await finish()`` (or ``await fail(sentence)``). A background task makes
    at most one call per ``edit_interval`` seconds for each message, showing the text so far followed
    by ``marker``; finishing removes the marker everywhere. The first edit that shows answer text goes
    out at once, so the first words appear at the first token; the interval applies from then on.

    A message the sink reports as gone (:class:`MessageGone`, or :meth:`message_gone`) is never written
    to again, and when it was the last one no new message follows it; ``on_gone`` is called once when
    the first message goes.
    """

    def __init__(
        self,
        sink: MessageSink[H],
        *,
        limit: int = 2000,
        edit_interval: float = 1.0,
        marker: str = DEFAULT_MARKER,
        final_attempts: int = 3,
        retry_delay: float = 0.5,
    ) -> None:
        if limit <= len(marker):
            raise ValueError("limit must leave room for the marker")
        if final_attempts < 1:
            raise ValueError("final_attempts must be at least 1")
        self._sink = sink
        self._limit = limit
        self._interval = edit_interval
        self._marker = marker
        self._final_attempts = final_attempts
        self._retry_delay = retry_delay

        self.messages: list[H] = []
        self._pieces: list[str] = []
        self._placeholder: str | None = None
        # The finished messages' texts, and how much of the reply they hold.
        self._parts: list[str] = []
        self._committed = 0
        # What each message shows now, and when it was last sent or edited (attempts count too,
        # since a failed request still spends the rate limit).
        self._shown: list[str] = []
        self._touched: dict[int, float] = {}
        self._final: str | None = None
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        # Whether answer text has been shown yet: that first edit is not held back by the interval.
        self._text_shown = False
        self._has_text = asyncio.Event()
        # Indices of messages that were deleted under us.
        self._gone: set[int] = set()
        self.on_gone: Callable[[], None] | None = None

    # --- public ---------------------------------------------------------------------------------
    @property
    def gone(self) -> bool:
        """Whether a message of this reply was deleted."""
        return bool(self._gone)

    @property
    def text(self) -> str:
        """The answer received so far (without any suffix or error line)."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    async def start(self, initial_text: str) -> None:
        """Post the first message right away (a placeholder such as "Thinking…").

        A failure here propagates: with no message there is nothing to stream into.
        """
        if self.messages or self._writer is not None:
            raise RuntimeError("the reply has already started")
        content = self._clip(initial_text)
        self._touched[0] = self._now()
        self.messages.append(await self._sink.send(content, live=True))
        self._shown.append(content)
        self._placeholder = content
        self._ensure_writer()

    async def status(self, text: str) -> None:
        """Replace the placeholder (e.g. a new queue position); ignored once the answer has begun.

        Changes are coalesced: the message shows the latest status at most once per interval.
        """
        if self._final is not None or self.text:
            return
        self._placeholder = self._clip(text)
        self._poke()

    def feed(self, piece: str) -> None:
        """Append a piece of the answer; returns at once, the background task shows it."""
        if self._final is not None:
            raise RuntimeError("the reply has already finished")
        if piece:
            self._pieces.append(piece)
            self._has_text.set()
            self._poke()

    async def finish(self, final_suffix: str = "") -> bool:
        """Show the complete answer (plus ``final_suffix``) without the marker in every message.

        Failed edits are retried a few times with backoff. Returns whether every message ended up
        showing its final text; failures are logged, not raised.
        """
        answer = self.text
        if not self._parts and not answer.strip():
            answer = EMPTY_ANSWER
        return await self._close(answer + final_suffix)

    async def stop(self, note: str) -> bool:
        """End the reply early: the text so far followed by ``note``, or only the note if there is no text.

        Messages that were deleted stay untouched, and no new message follows a deleted last one.
        """
        answer = self.text
        final = answer + note if answer.strip() or self._parts else note.strip()
        return await self._close(final or BLANK_STATUS)

    def message_gone(self, index: int) -> None:
        """Note that ``messages[index]`` was deleted, so that nothing is written to it again."""
        if 0 <= index < len(self.messages):
            self._mark_gone(index)

    async def fail(self, sentence: str) -> bool:
        """End the reply with the text so far and an error line, or only ``sentence`` if there is none."""
        sentence = sentence or FAILED_WITHOUT_REASON
        answer = self.text
        final = answer + FAILURE_LINE.format(sentence=sentence) if answer.strip() or self._parts else sentence
        return await self._close(final)

    # --- background writer ----------------------------------------------------------------------
    def _ensure_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._run(), name="reply-streamer")

    def _poke(self) -> None:
        self._ensure_writer()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._closing.is_set():
                return
            await self._sync(final=False)

    async def _close(self, final: str) -> bool:
        if self._final is not None:
            raise RuntimeError("the reply has already finished")
        self._final = final
        self._closing.set()
        self._wake.set()
        if self._writer is not None:
            # Let an edit in flight complete rather than cancel it: a cancelled request may still
            # reach the server and land after the final edit, bringing the marker back.
            try:
                await self._writer
            except Exception:
                log.exception("reply writer failed")
        return await self._sync(final=True)

    async def _sync(self, *, final: bool) -> bool:
        """Bring every message up to date, one call at a time; returns whether all are current."""
        failures = 0
        while True:
            wanted = self._layout(final=final)
            index = next(
                (i for i, content in enumerate(wanted) if i not in self._gone and self._showing(i) != content), None
            )
            if index is None:
                return not self._gone
            if index >= len(self.messages) and len(self.messages) - 1 in self._gone:
                # The message being written was deleted: continuing in a new one would resurrect it.
                return False
            if not final and self._closing.is_set():
                return False
            first_text = not self._text_shown and bool(self.text)
            delay = self._touched.get(index, float("-inf")) + self._interval - self._now()
            if delay > 0 and not first_text:
                if final:
                    await asyncio.sleep(delay)
                elif await self._closing_within(delay):
                    return False
                continue  # more text may have arrived meanwhile
            content = wanted[index]
            # A message is live until its last write: the final layout, or a part already split off.
            live = not final and index >= len(self._parts)
            self._touched[index] = self._now()
            self._text_shown = self._text_shown or first_text
            try:
                if index < len(self.messages):
                    await self._sink.edit(self.messages[index], content, live=live)
                    self._shown[index] = content
                else:
                    self.messages.append(await self._sink.send(content, live=live))
                    self._shown.append(content)
            except MessageGone:
                log.info("reply message %d was deleted; no more edits to it", index + 1)
                self._mark_gone(index)
            except Exception:
                failures += 1
                if not final:
                    # The next tick tries again with newer text; nothing is lost by waiting.
                    log.warning("reply update failed (message %d); will retry", index + 1, exc_info=True)
                    return False
                if failures >= self._final_attempts:
                    log.exception("reply message %d could not be finalised", index + 1)
                    return False
                log.warning("final reply update failed (message %d); retrying", index + 1, exc_info=True)
                await asyncio.sleep(self._retry_delay * 2 ** (failures - 1))
            else:
                failures = 0

    def _mark_gone(self, index: int) -> None:
        first = not self._gone
        self._gone.add(index)
        if first and self.on_gone is not None:
            try:
                self.on_gone()
            except Exception:
                log.exception("on_gone callback failed")

    async def _closing_within(self, delay: float) -> bool:
        """Wait ``delay`` seconds, less if the reply closes or its first text arrives; returns whether closing."""
        waits = [asyncio.ensure_future(self._closing.wait())]
        if not self._text_shown:
            # A status update may be waiting out the interval; the first words must not wait behind it.
            waits.append(asyncio.ensure_future(self._has_text.wait()))
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self._closing.is_set()

    # --- layout ----------------------------------------------------------------------------------
    def _layout(self, *, final: bool) -> list[str]:
        """What each message should show now."""
        body = self._final if final and self._final is not None else self.text
        self._commit(body, final=final)
        wanted = list(self._parts)
        rest = body[self._committed :]
        if final:
            wanted.append(rest)
        elif rest:
            wanted.append(rest[: self._limit - len(self._marker)] + self._marker)
        elif self._placeholder is not None and not wanted:
            wanted.append(self._placeholder)
        return wanted

    def _commit(self, body: str, *, final: bool) -> None:
        while len(body) - self._committed > self._limit:
            cut = find_cut(body, self._committed, self._limit, final=final)
            if cut is None:
                return
            self._parts.append(body[self._committed : cut])
            self._committed = cut

    def _showing(self, index: int) -> str | None:
        return self._shown[index] if index < len(self._shown) else None

    def _clip(self, text: str) -> str:
        # Discord refuses blank messages, so a blank placeholder would fail the whole reply.
        return text[: self._limit] if text.strip() else BLANK_STATUS

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

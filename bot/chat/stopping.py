"""Answers that are running, and how to stop one: independent of Discord.

Every answer the chat service works on is registered here while it runs, findable by the message that
asked and by the messages of its reply. The Discord side only maps events to :meth:`RunningAnswer.stop`:
a Stop button, a deleted reply, a deleted question.

Stopping is cooperative at the points where an answer waits for long (its turn in the queue, the
model's tokens): there the answer's task is cancelled and the cancellation turns into :class:`Stopped`.
Short steps (building the prompt, storing turns) finish first and the stop takes effect right after.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.chat.service import Question
    from bot.chat.streaming import ReplyStreamer

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
STOPPED_NOTE = "\n-# ⏹️ Stopped."
QUESTION_DELETED_NOTE = "\n-# ⏹️ Stopped: the question was deleted."


class StopReason(enum.Enum):
    """Why an answer ended early."""

    STOPPED = "stopped"  # the asker (or an admin) pressed Stop
    REPLY_DELETED = "reply deleted"
    QUESTION_DELETED = "question deleted"

    @property
    def note(self) -> str:
        """The line the reply ends with (on the messages of it that still exist)."""
        return QUESTION_DELETED_NOTE if self is StopReason.QUESTION_DELETED else STOPPED_NOTE


class Stopped(Exception):
    """Raised inside an answer's task once it has been stopped.

    ``turn_id`` is the question's stored turn, if it was stored before the stop, and ``resets`` how
    often the channel had been reset when it was; ``since`` is what the answer began under (the chat
    service's record of resets and forgets, here and in the database).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.turn_id: int | None = None
        self.resets = 0
        self.since: object = None


class RunningAnswer:
    """One answer in progress: the question, the reply being written, and a way to stop it."""

    def __init__(self, question: Question, streamer: ReplyStreamer[Any], task: asyncio.Task[Any]) -> None:
        self.question = question
        self.streamer = streamer
        self.reason: StopReason | None = None
        self.ended = asyncio.Event()
        self._task = task
        self._interruptible = False
        self._interrupted = False

    @property
    def author_id(self) -> int:
        """The person who asked."""
        return self.question.author_id

    def reply_ids(self) -> list[int]:
        """Ids of the reply's messages posted so far."""
        return [int(getattr(m, "id", 0) or 0) for m in self.streamer.messages]

    def is_question(self, message_id: int) -> bool:
        """Whether ``message_id`` is the message that asked."""
        return self.question.message_id is not None and self.question.message_id == message_id

    def owns(self, message_id: int) -> bool:
        """Whether ``message_id`` is the question or one of the reply's messages."""
        return self.is_question(message_id) or message_id in self.reply_ids()

    def stop(self, reason: StopReason, deleted_message_id: int | None = None) -> bool:
        """Stop the answer; returns False if it had already been stopped or has ended.

        ``deleted_message_id`` names a reply message that is gone, so nothing is written to it again.
        """
        if deleted_message_id is not None and deleted_message_id in (ids := self.reply_ids()):
            self.streamer.message_gone(ids.index(deleted_message_id))
        if self.reason is not None or self.ended.is_set():
            return False
        self.reason = reason
        log.info(
            "Answer to %s in channel %s stopped: %s",
            self.question.message_id or "a command",
            self.question.channel_id,
            reason.value,
        )
        if self._interruptible:
            self._interrupted = True
            self._task.cancel()
        return True

    def check(self) -> None:
        """Raise :class:`Stopped` if the answer was stopped."""
        if self.reason is not None:
            raise Stopped(self.reason.value)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch of waiting that :meth:`stop` may cut short; raises :class:`Stopped` when it does.

        Only cancellations made by :meth:`stop` become :class:`Stopped`; any other cancellation (the bot
        shutting down) passes through unchanged.
        """
        self.check()
        self._interruptible = True
        try:
            yield
        except asyncio.CancelledError:
            if self._interrupted:
                self._interrupted = False
                if self._task.uncancel() == 0:
                    raise Stopped(self.reason.value if self.reason else "stopped") from None
            raise
        finally:
            self._interruptible = False
        self.check()


class RunningAnswers:
    """The registry of answers in progress."""

    def __init__(self) -> None:
        self._answers: list[RunningAnswer] = []

    def __len__(self) -> int:
        return len(self._answers)

    def begin(self, question: Question, streamer: ReplyStreamer[Any]) -> RunningAnswer:
        """Register the answer the current task is about to give."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an answer must run in a task")
        running = RunningAnswer(question, streamer, task)
        self._answers.append(running)
        return running

    def end(self, running: RunningAnswer) -> None:
        """Unregister an answer that has ended (whatever the outcome)."""
        running.ended.set()
        if running in self._answers:
            self._answers.remove(running)

    def find(self, message_id: int) -> RunningAnswer | None:
        """The running answer that ``message_id`` asked or belongs to, if any."""
        return next((a for a in self._answers if a.owns(message_id)), None)

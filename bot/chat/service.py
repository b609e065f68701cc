"""One question's path from history to a finished streamed answer, independent of Discord.

history store (read) -> prompt builder (fits the context) -> scheduler (queue, one per person)
-> engine (stream) -> reply streamer (edits) -> history store (both turns)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from bot.chat.arrivals import Arrival, in_turn
from bot.chat.images import stored_image
from bot.chat.prompt import BuiltPrompt, HistoryTurn, build_prompt
from bot.chat.scheduler import AlreadyAsking, QueueFull, Scheduler
from bot.chat.stopping import RunningAnswer, RunningAnswers, Stopped, StopReason
from bot.chat.streaming import ReplyStreamer
from bot.engine.base import EngineError, GenerationSettings, ImageRef
from bot.engine.lru import LruCache
from bot.engine.manager import ModelManager
from bot.store.history import HistoryStore, StoredImage, StoredTurn
from bot.store.privacy import Removed
from bot.store.shared import Generations, SharedRules

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
THINKING = "⏳ Thinking…"
WAITING = "⏳ Waiting in line: position {position}."
DROPPED_NOTE = "\n-# Only the last {kept} messages of this channel's conversation fit in the model's memory."
UNEXPECTED = "Something went wrong on my side while answering; the details were logged."
STOPPED = "I was stopped before I could finish."
DEFAULT_QUESTION = "Describe this image."

# The settings key under which /precision saves the model's precision for every process of the database.
PRECISION_SETTING = "precision"

# Which question each recent answer answered, so that deleting a question also forgets its answer.
REMEMBERED_ANSWERS = 10_000


@dataclass(frozen=True)
class Question:
    """A person's question, already stripped of the bot's mention."""

    channel_id: int
    author_id: int
    author_name: str
    text: str
    image: ImageRef | None = None
    message_id: int | None = None
    # A line shown after the answer (not stored), e.g. which attachments were not looked at.
    note: str = ""
    # Its place in the person's line: the one-question check waits for the questions that came before it.
    arrival: Arrival | None = field(default=None, compare=False)


@dataclass(frozen=True)
class _Since:
    """What an answer began under: this process's counts of resets and forgets, and the database's."""

    resets: int
    forgets: int
    shared: Generations | None


@dataclass(frozen=True)
class Answer:
    """What was said, for callers and tests."""

    text: str
    message_ids: tuple[int, ...]
    completed: bool


class ChatService:
    """Answers questions with the channel's history; every failure ends in a sentence for the person."""

    def __init__(
        self,
        store: HistoryStore,
        models: ModelManager,
        scheduler: Scheduler,
        settings: GenerationSettings,
        history_turns: int = 40,
        *,
        rules: SharedRules | None = None,
    ) -> None:
        self.store = store
        # The rules that hold across every process of the database; without them, only within this one.
        self.rules = rules
        self.models = models
        self.scheduler = scheduler
        self.settings = settings
        self.history_turns = history_turns
        # Decoded images by content hash: follow-ups reuse the picture without decoding it again.
        self._images: LruCache[str, ImageRef] = LruCache(16)
        # How often each channel was reset: an answer finishing after a reset must not be stored.
        self._resets: collections.Counter[int] = collections.Counter()
        # The same for each person's /forget: their answer in flight must not be stored after it.
        self._forgets: collections.Counter[int] = collections.Counter()
        # How a reply cut short by cancellation ends; a shutdown puts its own sentence here.
        self.interrupted_sentence = STOPPED
        self.running = RunningAnswers()
        # Question message id -> the stored answer turn's id.
        self._answer_turns: OrderedDict[int, int] = OrderedDict()
        # The saved precision last acted on, so that a precision this process can't load is tried once.
        self._precision_seen: str | None = None

    async def answer(self, question: Question, streamer: ReplyStreamer[Any]) -> Answer:
        """Queue the question, stream the answer into ``streamer`` and store both turns.

        While it runs the answer is listed in :attr:`running`, where a Stop button
        (``running.find(message_id).stop(...)``) or a deleted message (:meth:`message_deleted`) can end it early.
        """
        running = self.running.begin(question, streamer)

        def reply_gone() -> None:
            # An edit found the reply deleted before (or without) the delete event.
            running.stop(StopReason.REPLY_DELETED)

        streamer.on_gone = reply_gone
        try:
            return await self._answer(question, streamer, running)
        finally:
            self.running.end(running)

    async def _answer(self, question: Question, streamer: ReplyStreamer[Any], running: RunningAnswer) -> Answer:
        await streamer.start(THINKING)

        async def show_position(position: int) -> None:
            await streamer.status(WAITING.format(position=position))

        try:
            async with contextlib.AsyncExitStack() as stack:
                with running.interruptible():
                    async with in_turn(question.arrival):
                        await stack.enter_async_context(self._person_lock(question))
                    # Nothing awaits between leaving the person's line and the scheduler's own check.
                    await stack.enter_async_context(self.scheduler.slot(question.author_id, on_position=show_position))
                return await self._generate(question, streamer, running)
        except Stopped as stopped:
            # Out of the slot first: the next question need not wait for the closing edit.
            since = stopped.since if isinstance(stopped.since, _Since) else None
            return await self._stopped(question, streamer, running, stopped.turn_id, since)
        except (QueueFull, AlreadyAsking, EngineError) as error:
            log.info("Question in channel %s from %s not answered: %s", question.channel_id, question.author_id, error)
            await streamer.fail(str(error))
        except asyncio.CancelledError:
            await asyncio.shield(streamer.fail(self.interrupted_sentence))
            raise
        except Exception:
            log.exception("Answering in channel %s failed", question.channel_id)
            await streamer.fail(UNEXPECTED)
        return Answer(streamer.text, self._ids(streamer), completed=False)

    async def _generate(self, question: Question, streamer: ReplyStreamer[Any], running: RunningAnswer) -> Answer:
        since = await self._since(question)
        await self._follow_precision()
        prompt = await self._prompt(question)
        image = StoredImage.from_ref(question.image) if question.image is not None else None
        running.check()
        # The question is stored before generating so that a crash mid-answer keeps the image for follow-ups.
        turn_id = await self.store.add_user_turn(
            question.channel_id,
            question.text,
            author_id=question.author_id,
            author_name=question.author_name,
            image=image,
            message_ids=[question.message_id] if question.message_id else [],
        )
        stream = self.models.generate(prompt.conversation, self.settings)
        try:
            with running.interruptible():
                async for piece in stream:
                    streamer.feed(piece)
        except Stopped as stopped:
            stopped.turn_id, stopped.resets, stopped.since = turn_id, since.resets, since
            raise
        finally:
            stream.cancel()
        kept = len(prompt.conversation)
        dropped = DROPPED_NOTE.format(kept=kept) if prompt.dropped else ""
        completed = await streamer.finish(dropped + question.note)
        ids = self._ids(streamer)
        try:
            answer_id = await self._store_answer(question, since, streamer.text, ids)
            if answer_id is not None:
                self._remember_answer(question, answer_id)
            else:
                # The question went with the reset (or /forget); an answer stored alone would bring it back.
                log.info("Channel %s was reset while answering; the answer is not kept", question.channel_id)
        except Exception:
            # The person already has the whole answer; only the channel's memory of it is lost.
            log.exception("Storing the answer in channel %s failed", question.channel_id)
        stats = stream.stats
        log.info(
            "Answered in channel %s: %d prompt tokens, %d new tokens, first after %.2f s, %.1f tokens/s",
            question.channel_id,
            stats.prompt_tokens,
            stats.new_tokens,
            stats.time_to_first_token or 0.0,
            stats.decode_tokens_per_second or 0.0,
        )
        return Answer(streamer.text, ids, completed)

    async def _stopped(
        self,
        question: Question,
        streamer: ReplyStreamer[Any],
        running: RunningAnswer,
        turn_id: int | None,
        since: _Since | None = None,
    ) -> Answer:
        """End a stopped answer: close the reply with a note and keep only what the reason allows.

        Stopped by the asker, the question and the text written so far stay in the conversation (a
        follow-up may refer to them); stopped before any text, the question is forgotten like one never
        answered. A deleted reply or question takes the whole exchange out of the conversation.
        """
        reason = running.reason or StopReason.STOPPED
        await streamer.stop(reason.note)
        ids = self._ids(streamer)
        keep = reason is StopReason.STOPPED and bool(streamer.text.strip())
        try:
            if turn_id is not None and not keep:
                await self._delete_turns([turn_id])
            elif turn_id is not None and since is not None:
                answer_id = await self._store_answer(question, since, streamer.text, ids)
                if answer_id is not None:
                    self._remember_answer(question, answer_id)
        except Exception:
            log.exception("Updating the conversation of channel %s after a stop failed", question.channel_id)
        return Answer(streamer.text, ids, completed=False)

    async def message_deleted(self, message_id: int) -> None:
        """React to a deleted Discord message: stop the answer it belongs to, forget a deleted question.

        A deleted question takes its stored turn with it (and its image, when no other turn uses it),
        together with the bot's answer to it, even when it was answered long ago. A deleted reply stops
        its answer; a reply deleted after its answer ended changes nothing.
        """
        running = self.running.find(message_id)
        if running is not None and not running.is_question(message_id):
            running.stop(StopReason.REPLY_DELETED, deleted_message_id=message_id)
            return
        if running is not None:
            running.stop(StopReason.QUESTION_DELETED)
            # Whatever the answer stores on its way out must be forgotten too.
            await running.ended.wait()
        await self.forget_question(message_id)

    async def forget_question(self, message_id: int) -> int:
        """Delete the stored question asked by ``message_id`` and the answer to it; returns turns removed."""
        turn = await self.store.find_turn_by_message(message_id)
        if turn is None or turn.role != "user":
            return 0
        doomed = [turn.id]
        answer_id = self._answer_turns.pop(message_id, None)
        if answer_id is None:
            answer_id = await self._answer_by_position(turn)
        if answer_id is not None:
            doomed.append(answer_id)
        removed = await self._delete_turns(doomed)
        log.info("Question %s was deleted: %d turns forgotten", message_id, removed)
        return removed

    async def _answer_by_position(self, turn: StoredTurn) -> int | None:
        """For answers from before a restart: the turn right after the question, if it is unambiguous.

        When the turn before is another question, two answers were being written at once in the
        channel and the order alone can't tell which answer is this question's; then none is removed.
        """
        before, after = await self.store.adjacent_turns(turn.id)
        if after is None or after.role != "assistant" or (before is not None and before.role == "user"):
            return None
        return after.id

    async def _delete_turns(self, turn_ids: list[int]) -> int:
        removed, images = await self.store.delete_turns(turn_ids)
        for sha256 in images:
            self._images.discard(sha256)
        return removed

    def _remember_answer(self, question: Question, answer_id: int) -> None:
        if question.message_id is None:
            return
        self._answer_turns[question.message_id] = answer_id
        while len(self._answer_turns) > REMEMBERED_ANSWERS:
            self._answer_turns.popitem(last=False)

    async def _prompt(self, question: Question) -> BuiltPrompt:
        stored = await self.store.turns(question.channel_id, limit=self.history_turns)
        history = [HistoryTurn(t.role, t.text, t.image_sha256) for t in stored]
        history.append(HistoryTurn("user", question.text, question.image.sha256 if question.image else None))
        if question.image is not None:
            self._images.put(question.image.sha256, question.image)
        sha = next((h.image_sha256 for h in reversed(history) if h.image_sha256), None)
        if sha is not None and self._images.get(sha) is None:
            data = await self.store.image_bytes(sha)
            if data is None:
                raise EngineError("The image of this conversation is gone; please send it again.")
            self._images.put(sha, await asyncio.to_thread(stored_image, sha, data))
        images = self._images
        models = self.models

        def load(sha256: str) -> ImageRef:
            image = images.get(sha256)
            assert image is not None, "fetched above"
            return image

        # Counting tokens runs the image processor: keep it off the event loop.
        return await asyncio.to_thread(
            build_prompt,
            history,
            load,
            models.count_prompt_tokens,
            models.context_window,
            self.settings.max_new_tokens,
        )

    async def reset(self, channel_id: int) -> int:
        """Forget a channel's conversation; returns the number of turns removed.

        An answer still being written for the channel, in this process or another, is not stored.
        """
        self._resets[channel_id] += 1
        if self.rules is not None:
            await self.rules.bump_channel(channel_id)
        return await self.store.reset(channel_id)

    async def forget(self, author_id: int) -> Removed:
        """Delete everything one person stored, in every channel, including an answer being written now."""
        self._forgets[author_id] += 1
        if self.rules is not None:
            await self.rules.bump_author(author_id)
        return await self.store.forget_author(author_id)

    @contextlib.asynccontextmanager
    async def _person_lock(self, question: Question) -> AsyncIterator[None]:
        """Hold the person's one question in the database for as long as it waits and runs."""
        rules = self.rules
        if rules is None:
            yield
            return
        if not await rules.claim(question.author_id, question.channel_id):
            raise AlreadyAsking()
        try:
            yield
        finally:
            try:
                await asyncio.shield(rules.release(question.author_id))
            except Exception:
                # The claim lapses by itself once this process stops refreshing it.
                log.exception("Could not release the question of %s", question.author_id)

    async def _since(self, question: Question) -> _Since:
        shared = await self.rules.current(question.channel_id, question.author_id) if self.rules else None
        return _Since(self._resets[question.channel_id], self._forgets[question.author_id], shared)

    async def _store_answer(self, question: Question, since: _Since, text: str, ids: tuple[int, ...]) -> int | None:
        """Store the answer unless a /reset or /forget, here or in another process, came since it began."""
        if since.resets != self._resets[question.channel_id] or since.forgets != self._forgets[question.author_id]:
            return None
        if self.rules is not None and since.shared is not None:
            return await self.rules.add_answer_if_current(
                question.channel_id, question.author_id, since.shared, text, message_ids=ids
            )
        return await self.store.add_assistant_turn(question.channel_id, text, message_ids=ids)

    async def _follow_precision(self) -> None:
        """Switch to the precision saved in the database when another process's /precision changed it."""
        saved = await self.store.get_setting(PRECISION_SETTING)
        if saved is None or saved == self._precision_seen:
            return
        self._precision_seen = saved
        models = self.models
        if saved == models.precision or saved not in models.available():
            return
        log.info("The saved precision changed to %s (by another process); switching from %s", saved, models.precision)
        try:
            await models.switch(saved)
        except (EngineError, RuntimeError):
            log.exception("Switching to the saved precision %s failed; staying at %s", saved, models.precision)

    @staticmethod
    def _ids(streamer: ReplyStreamer[Any]) -> tuple[int, ...]:
        return tuple(int(getattr(m, "id", 0)) for m in streamer.messages if getattr(m, "id", None))

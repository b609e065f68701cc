"""One question's path from history to a finished streamed answer, independent of Discord.

history store (read) -> prompt builder (fits the context) -> scheduler (queue, one per person)
-> engine (stream) -> reply streamer (edits) -> history store (both turns)
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from PIL import Image

from bot.chat.images import PreparedImage
from bot.chat.prompt import BuiltPrompt, HistoryTurn, build_prompt
from bot.chat.scheduler import AlreadyAsking, QueueFull, Scheduler
from bot.chat.streaming import ReplyStreamer
from bot.engine.base import EngineError, GenerationSettings, with_source
from bot.engine.manager import ModelManager
from bot.store.history import HistoryStore, StoredImage

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
THINKING = "⏳ Thinking…"
WAITING = "⏳ Waiting in line: position {position}."
DROPPED_NOTE = "\n-# Only the last {kept} messages of this channel's conversation fit in the model's memory."
UNEXPECTED = "Something went wrong on my side while answering; the details were logged."
DEFAULT_QUESTION = "Describe this image."


@dataclass(frozen=True)
class Question:
    """A person's question, already stripped of the bot's mention."""

    channel_id: int
    author_id: int
    author_name: str
    text: str
    image: PreparedImage | None = None
    message_id: int | None = None


@dataclass(frozen=True)
class Answer:
    """What was said, for callers and tests."""

    text: str
    message_ids: tuple[int, ...]
    completed: bool


class _ImageCache:
    """Decoded images by content hash: follow-ups reuse the picture without decoding it again."""

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._items: OrderedDict[str, Image.Image] = OrderedDict()

    def get(self, sha256: str) -> Image.Image | None:
        image = self._items.get(sha256)
        if image is not None:
            self._items.move_to_end(sha256)
        return image

    def put(self, sha256: str, image: Image.Image) -> None:
        self._items[sha256] = image
        self._items.move_to_end(sha256)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


class ChatService:
    """Answers questions with the channel's history; every failure ends in a sentence for the person."""

    def __init__(
        self,
        store: HistoryStore,
        models: ModelManager,
        scheduler: Scheduler,
        settings: GenerationSettings,
        history_turns: int = 40,
    ) -> None:
        self.store = store
        self.models = models
        self.scheduler = scheduler
        self.settings = settings
        self.history_turns = history_turns
        self._images = _ImageCache()
        # How often each channel was reset: an answer finishing after a reset must not be stored.
        self._resets: collections.Counter[int] = collections.Counter()

    async def answer(self, question: Question, streamer: ReplyStreamer[Any]) -> Answer:
        """Queue the question, stream the answer into ``streamer`` and store both turns."""
        await streamer.start(THINKING)

        async def show_position(position: int) -> None:
            await streamer.status(WAITING.format(position=position))

        try:
            async with self.scheduler.slot(question.author_id, on_position=show_position):
                return await self._generate(question, streamer)
        except (QueueFull, AlreadyAsking, EngineError) as error:
            log.info("Question in channel %s from %s not answered: %s", question.channel_id, question.author_id, error)
            await streamer.fail(str(error))
        except asyncio.CancelledError:
            await asyncio.shield(streamer.fail("I was stopped before I could finish."))
            raise
        except Exception:
            log.exception("Answering in channel %s failed", question.channel_id)
            await streamer.fail(UNEXPECTED)
        return Answer(streamer.text, self._ids(streamer), completed=False)

    async def _generate(self, question: Question, streamer: ReplyStreamer[Any]) -> Answer:
        resets = self._resets[question.channel_id]
        prompt = await self._prompt(question)
        image = None
        if question.image is not None:
            prepared = question.image
            image = StoredImage(prepared.data, prepared.mime, prepared.width, prepared.height)
        # The question is stored before generating so that a crash mid-answer keeps the image for follow-ups.
        await self.store.add_user_turn(
            question.channel_id,
            question.text,
            author_id=question.author_id,
            author_name=question.author_name,
            image=image,
            message_ids=[question.message_id] if question.message_id else [],
        )
        stream = self.models.generate(prompt.conversation, self.settings)
        try:
            async for piece in stream:
                streamer.feed(piece)
        finally:
            stream.cancel()
        kept = len(prompt.conversation)
        completed = await streamer.finish(DROPPED_NOTE.format(kept=kept) if prompt.dropped else "")
        ids = self._ids(streamer)
        if self._resets[question.channel_id] == resets:
            try:
                await self.store.add_assistant_turn(question.channel_id, streamer.text, message_ids=ids)
            except Exception:
                # The person already has the whole answer; only the channel's memory of it is lost.
                log.exception("Storing the answer in channel %s failed", question.channel_id)
        else:
            # The question went with the reset; an answer stored alone would bring the old conversation back.
            log.info("Channel %s was reset while answering; the answer is not kept", question.channel_id)
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

    async def _prompt(self, question: Question) -> BuiltPrompt:
        stored = await self.store.turns(question.channel_id, limit=self.history_turns)
        history = [HistoryTurn(t.role, t.text, t.image_sha256) for t in stored]
        history.append(HistoryTurn("user", question.text, question.image.sha256 if question.image else None))
        if question.image is not None:
            self._images.put(question.image.sha256, with_source(question.image.image, question.image.data))
        sha = next((h.image_sha256 for h in reversed(history) if h.image_sha256), None)
        if sha is not None and self._images.get(sha) is None:
            data = await self.store.image_bytes(sha)
            if data is None:
                raise EngineError("The image of this conversation is gone; please send it again.")
            self._images.put(sha, await asyncio.to_thread(_decode, data))
        images = self._images
        models = self.models

        def load(sha256: str) -> Image.Image:
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
        """Forget a channel's conversation; returns the number of turns removed."""
        self._resets[channel_id] += 1
        return await self.store.reset(channel_id)

    @staticmethod
    def _ids(streamer: ReplyStreamer[Any]) -> tuple[int, ...]:
        return tuple(int(getattr(m, "id", 0)) for m in streamer.messages if getattr(m, "id", None))


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return with_source(image.convert("RGB"), data)

"""Shared helpers of the bot's end-to-end tests: uploads, and waiting for complete answers."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from bot.chat.images import ImageLimits, load_image
from bot.chat.streaming import DEFAULT_MARKER
from bot.config import Config
from bot.engine.base import Engine, GenerationSettings, ImageRef, Turn
from bot.engine.manager import load_engine
from tests.conftest import sample_image
from tests.e2e.discord_emulator import JSON, DiscordEmulator, InteractionRecord, MessageRecord

MARKER = DEFAULT_MARKER.strip()
WAITING = "⏳"


# --- uploads --------------------------------------------------------------------------------------
def png(seed: int = 0, size: tuple[int, int] = (120, 90)) -> bytes:
    buffer = io.BytesIO()
    sample_image(size, seed).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(seed: int = 0, size: tuple[int, int] = (240, 180)) -> bytes:
    buffer = io.BytesIO()
    sample_image(size, seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def seen_by_model(upload: bytes) -> ImageRef:
    """The picture the bot shows the model for ``upload`` (normalised exactly as the bot does)."""
    return load_image(upload, ImageLimits())


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# --- a slow model (for the engine tests; the bot's tests use tests/support/scripted.py) -------------
class HeldPipeline:
    """Wraps an openvino-genai pipeline to pause generation until :attr:`release` is set: a slow model.

    With ``after`` 0 generation pauses before it starts, else once it has streamed ``after`` pieces.
    :attr:`entered` is set when the pause begins.
    """

    def __init__(self, pipeline: object, after: int = 0) -> None:
        self.pipeline = pipeline
        self.after = after
        self.entered = threading.Event()
        self.release = threading.Event()

    def _pause(self) -> None:
        self.entered.set()
        self.release.wait(60)

    def generate(self, *args: object, streamer: Callable[[str], object], **kwargs: object) -> object:
        streamed = 0

        def on_text(piece: str) -> object:
            nonlocal streamed
            streamed += 1
            if streamed == self.after:
                self._pause()
            return streamer(piece)

        if self.after == 0:
            self._pause()
        return self.pipeline.generate(*args, streamer=on_text, **kwargs)  # type: ignore[attr-defined]


# --- what the bot said ----------------------------------------------------------------------------
def replies_to(emulator: DiscordEmulator, message_id: int) -> list[MessageRecord]:
    return [m for m in emulator.bot_messages() if m.reference_id == message_id]


def reply_content(emulator: DiscordEmulator, asked: JSON) -> str:
    """What the bot's reply to ``asked`` shows now ("" before there is one)."""
    replies = replies_to(emulator, int(asked["id"]))
    return replies[0].content if replies else ""


def answer_messages(emulator: DiscordEmulator, asked: JSON) -> list[MessageRecord]:
    """The bot's reply to ``asked`` and the messages continuing it (a channel holds one answer at a time)."""
    replies = replies_to(emulator, int(asked["id"]))
    if not replies:
        return []
    first = replies[0]
    rest = [
        m
        for m in emulator.bot_messages(first.channel_id)
        if m.id > first.id and m.reference_id is None and m.source == "channel"
    ]
    return [first, *rest]


def text_of(messages: Sequence[MessageRecord]) -> str:
    return "".join(m.content for m in messages)


def _last_write(emulator: DiscordEmulator, fragment: str) -> float:
    return max((r.at for r in emulator.requests if fragment in r.path), default=0.0)


def _finished(messages: Sequence[MessageRecord]) -> bool:
    return bool(messages) and not any(
        m.is_loading or MARKER in m.content or m.content.startswith(WAITING) for m in messages
    )


# How often a wait for a quiet spell looks again: the spell ends with no write to wake the waiter.
QUIET_RECHECK = 0.05


async def wait_answer(
    emulator: DiscordEmulator, asked: JSON, *, quiet: float = 0.6, within: float = 60
) -> list[MessageRecord]:
    """Wait until the answer to ``asked`` is complete (no marker, no placeholder, no writes for ``quiet`` s)."""
    fragment = f"/channels/{asked['channel_id']}/"

    def done() -> list[MessageRecord] | None:
        messages = answer_messages(emulator, asked)
        if _finished(messages) and time.monotonic() - _last_write(emulator, fragment) >= quiet:
            return messages
        return None

    return await emulator.wait_for(done, within, recheck=QUIET_RECHECK)


async def wait_response(
    emulator: DiscordEmulator, interaction: InteractionRecord, *, quiet: float = 0.6, within: float = 60
) -> list[MessageRecord]:
    """Wait until the bot's response to a slash command is complete and return its messages."""

    def done() -> list[MessageRecord] | None:
        messages = emulator.interaction_responses(interaction).messages
        if _finished(messages) and time.monotonic() - _last_write(emulator, interaction.token) >= quiet:
            return messages
        return None

    return await emulator.wait_for(done, within, recheck=QUIET_RECHECK)


async def unanswered(emulator: DiscordEmulator, *messages: JSON) -> bool:
    """Whether the bot left all of ``messages`` without a reply (checked once it has been quiet a while)."""
    await asyncio.sleep(0.3)
    await emulator.wait_quiet(0.5, 30)
    return all(replies_to(emulator, int(message["id"])) == [] for message in messages)


# --- the engine alone -----------------------------------------------------------------------------
class ReferenceEngines:
    """The engine on its own (no Discord, no bot), one per precision folder, loaded once and kept."""

    def __init__(self) -> None:
        self._engines: dict[tuple[str, Path], Engine] = {}

    async def answer(self, config: Config, conversation: list[Turn], *, precision: str | None = None) -> str:
        """What the engine alone generates for ``conversation`` with the bot's settings."""
        model = config.model
        key = (model.engine, Path(model.dir) / (precision or model.precision))
        if key not in self._engines:
            self._engines[key] = await asyncio.to_thread(load_engine, *key)
        settings = GenerationSettings(
            max_new_tokens=model.max_new_tokens, temperature=model.temperature, top_p=model.top_p
        )
        return await self._engines[key].generate(conversation, settings).text()

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()

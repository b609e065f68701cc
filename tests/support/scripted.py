"""An engine for tests that answers with text the test chose, at a set pace, and fails, stalls or dies on cue.

It is a real :class:`~bot.engine.base.Engine`: the bot loads it through the engine registry like any other, so
everything between Discord and the model (queue, streaming, history, supervision) runs as in production while
the test decides what the model says and sees what the model was asked.

    monkeypatch.setitem(ENGINES, "scripted", "tests.support.scripted:ScriptedEngine")
    config.model.engine = "scripted"
    ...
    engine = scripted(bot)                   # the loaded instance
    engine.script(Reply("It is a cat."))     # the next answer; unscripted questions get default_answer()
    ...
    assert engine.requests[0].seen == [("user", "What is this?", (pixels(picture),))]

Settings come from ``model.ov_config`` (strings, as in a config file), so a ``llava-bot run`` child process
(see :mod:`tests.support.run`) can be scripted too: ``pace`` (seconds between pieces, default 0.005),
``context_window`` (4096), ``image_tokens`` (tokens an image takes, 576), ``concurrency`` (1),
``hold_after`` (every answer pauses after this many pieces ...), ``release_file`` (... until this file
exists; without one, until :meth:`ScriptedEngine.release`, which a child process never gets) and ``repeat``
(an unscripted answer is :func:`default_answer` said this many times over, default 1; more make it long enough to
fill several Discord messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from bot.engine.base import Engine, GenerationSettings, ImageRef, TextStream, Turn

NAME = "scripted"
ENTRY = "tests.support.scripted:ScriptedEngine"
# The reason failure() gives once the engine died on cue.
DIED = "the scripted engine died"
# Fixed costs of the prompt-counting rule: per turn (role markers) and per prompt (generation prompt).
TURN_TOKENS = 3
PROMPT_TOKENS = 2


def pixels(picture: Image.Image | ImageRef) -> str:
    """A short digest of an image's pixels: equal digests, equal pictures as the model sees them."""
    image = picture.image if isinstance(picture, ImageRef) else picture
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:16]


def pieces_of(text: str) -> list[str]:
    """``text`` cut into word-sized pieces (each keeps the spaces after it), as tokens arrive from a model."""
    return re.findall(r"\S+\s*|\s+", text)


def default_answer(conversation: Sequence[Turn]) -> str:
    """What the engine says to an unscripted question: it names the question and what came with it."""
    question = conversation[-1] if conversation else Turn("user", "")
    pictures = sum(len(turn.images) for turn in conversation)
    return (
        f"You asked {question.text!r}; I see {pictures} picture(s) in {len(conversation)} message(s)."
        if question.text
        else f"I see {pictures} picture(s) in {len(conversation)} message(s)."
    )


def count_tokens(conversation: Sequence[Turn], image_tokens: int) -> int:
    """The prompt-size rule: a token per word, fixed costs per turn and per prompt, ``image_tokens`` per image."""
    return PROMPT_TOKENS + sum(
        TURN_TOKENS + len(turn.text.split()) + image_tokens * len(turn.images) for turn in conversation
    )


@dataclass(frozen=True)
class Reply:
    """One scripted answer.

    ``text`` is streamed piece by piece (a string is cut into words; a sequence is taken as the pieces),
    at most ``settings.max_new_tokens`` pieces, as a model stops at its token limit. Then, in order of the
    pieces streamed: ``stall_after`` pauses the answer (no progress at all) until :meth:`ScriptedEngine.release`;
    ``die_after`` kills the engine (``failure()`` says so and the answer never ends by itself); ``error`` ends
    the answer with that exception once all pieces are out. ``pace`` overrides the engine's pace.
    """

    text: str | Sequence[str] = ""
    pace: float | None = None
    error: BaseException | None = None
    stall_after: int | None = None
    die_after: int | None = None

    def pieces(self) -> list[str]:
        return pieces_of(self.text) if isinstance(self.text, str) else list(self.text)


Outcome = Literal["running", "finished", "failed", "cancelled", "died"]


@dataclass
class Request:
    """What the engine was asked, and what it streamed."""

    conversation: tuple[Turn, ...]
    settings: GenerationSettings
    answer: str = ""
    outcome: Outcome = "running"

    @property
    def seen(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """The conversation as (role, text, pixel digests of its images)."""
        return [(turn.role, turn.text, tuple(pixels(image) for image in turn.images)) for turn in self.conversation]

    @property
    def question(self) -> str:
        """The text of the last turn: what was just asked."""
        return self.conversation[-1].text if self.conversation else ""


class ScriptedEngine(Engine):
    """An engine whose answers the test writes (see the module's docstring)."""

    name = NAME
    # It reads no converted model: ModelManager offers every precision and passes a folder path that need not exist.
    needs_model_folder = False

    def __init__(self, model_dir: str, device: str = "CPU", ov_config: dict[str, str] | None = None) -> None:
        super().__init__(model_dir, device, ov_config)
        options = self.ov_config
        self.precision = Path(model_dir).name
        self.pace = float(options.get("pace", "0.005"))
        self._context_window = int(options.get("context_window", "4096"))
        self.image_tokens = int(options.get("image_tokens", "576"))
        self.max_concurrency = int(options.get("concurrency", "1"))
        hold_after = options.get("hold_after")
        self.hold_after = int(hold_after) if hold_after is not None else None
        release_file = options.get("release_file")
        self.release_file = Path(release_file) if release_file else None
        self.repeat = int(options.get("repeat", "1"))
        self.requests: list[Request] = []
        self.replies: deque[Reply] = deque()
        self.dead: str | None = None
        self.killed = False
        self.closed = False
        # Answers paused at a stall now; released together.
        self.stalled = 0
        self._released = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- what the test controls ----------------------------------------------------------------
    def script(self, *replies: Reply | str) -> None:
        """Queue the next answers, in order; a string is a plain :class:`Reply`."""
        self.replies.extend(Reply(r) if isinstance(r, str) else r for r in replies)

    def release(self) -> None:
        """Let the answers stalled now go on (:attr:`stalled` counts them); later stalls wait for the next call."""
        self._released.set()
        self._released = asyncio.Event()

    def die(self, reason: str = DIED) -> None:
        """Die now, as a worker process killed from outside: answers in progress stop without an end."""
        self.dead = reason

    # --- Engine --------------------------------------------------------------------------------
    def generate(self, conversation: Sequence[Turn], settings: GenerationSettings) -> TextStream:
        loop = asyncio.get_running_loop()
        stream = TextStream(loop)
        request = Request(tuple(conversation), settings)
        self.requests.append(request)
        reply = (
            self.replies.popleft() if self.replies else Reply(" ".join([default_answer(conversation)] * self.repeat))
        )
        if self.hold_after is not None and reply.stall_after is None:
            reply = dataclasses.replace(reply, stall_after=self.hold_after)
        task = loop.create_task(self._stream(stream, request, reply), name="scripted-answer")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream

    def count_prompt_tokens(self, conversation: Sequence[Turn]) -> int:
        return count_tokens(conversation, self.image_tokens)

    @property
    def context_window(self) -> int:
        return self._context_window

    def failure(self) -> str | None:
        return self.dead

    def kill(self) -> bool:
        self.killed = True
        self.dead = self.dead or "killed"
        for task in list(self._tasks):
            task.cancel()
        return True

    def close(self) -> None:
        # Called off the event loop; answers still stalled end with the engine, as a freed model's would.
        self.closed = True
        for task in list(self._tasks):
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                task.get_loop().call_soon_threadsafe(task.cancel)

    # --- the answer ----------------------------------------------------------------------------
    async def _stall(self) -> None:
        self.stalled += 1
        try:
            if self.release_file is None:
                await self._released.wait()
                return
            released, path = self._released, self.release_file
            await until(lambda: path.exists() or released.is_set(), within=None)
        finally:
            self.stalled -= 1

    async def _cue(self, reply: Reply, index: int) -> bool:
        """Die or stall when ``index`` pieces are out, as scripted; False once the engine is dead."""
        if index == reply.die_after:
            self.die()
        if index == reply.stall_after:
            await self._stall()
        return self.dead is None

    async def _stream(self, stream: TextStream, request: Request, reply: Reply) -> None:
        pace = self.pace if reply.pace is None else reply.pace
        stream.stats.started = time.monotonic()
        stream.stats.prompt_tokens = self.count_prompt_tokens(request.conversation)
        pieces = reply.pieces()[: request.settings.max_new_tokens]
        try:
            for index, piece in enumerate(pieces):
                if not await self._cue(reply, index):
                    request.outcome = "died"
                    return  # a dead worker sends nothing more, not even an end
                if stream.cancelled:
                    break
                if pace:
                    await asyncio.sleep(pace)
                if stream.stats.first_token is None:
                    stream.stats.first_token = time.monotonic()
                stream.stats.new_tokens += 1
                request.answer += piece
                stream.push(piece)
            else:
                if not await self._cue(reply, len(pieces)):
                    request.outcome = "died"
                    return
        except asyncio.CancelledError:
            request.outcome = "died" if self.dead else "cancelled"
            raise
        stream.stats.finished = time.monotonic()
        if stream.cancelled:
            request.outcome = "cancelled"
            stream.finish()
            return
        request.outcome = "failed" if reply.error is not None else "finished"
        stream.finish(reply.error)


def scripted(bot: Any) -> ScriptedEngine:
    """The scripted engine a running bot has loaded now (a precision switch or a restart loads a new one)."""
    engine = bot.model_manager.engine
    assert isinstance(engine, ScriptedEngine), f"the bot runs {type(engine).__name__}, not the scripted engine"
    return engine


async def until(predicate: Callable[[], object], within: float | None = 30) -> None:
    """Wait until ``predicate()`` holds, polling (what it watches has no event to wait on); ``None``: for ever."""
    deadline = None if within is None else time.monotonic() + within
    for _ in itertools.count():
        if predicate():
            return
        if deadline is not None and time.monotonic() > deadline:
            raise AssertionError("the condition never came true")
        await asyncio.sleep(0.01)


async def until_asked(engine: ScriptedEngine, count: int = 1, within: float = 30) -> Request:
    """Wait until the engine has received ``count`` requests; returns the last of them."""
    await until(lambda: len(engine.requests) >= count, within)
    return engine.requests[count - 1]

"""What the bot asks of an inference engine: a conversation in, an async stream of text out."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from PIL import Image

log = logging.getLogger(__name__)

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class ImageRef:
    """One picture as it travels from upload to engine: its identity, its pixels and its stored file.

    ``sha256`` is the hex digest of ``data``, computed once where the bytes first arrive
    (:meth:`from_data`); everything after (the store, the engines' caches) names the picture by it instead
    of hashing again. ``image`` is the RGB picture the model sees, decoded from ``data``; ``data`` is sent
    as it is by engines that pass the file on (re-encoding could change the pixels). Two references are
    equal when their files are.
    """

    sha256: str
    image: Image.Image = field(repr=False, compare=False)
    data: bytes = field(repr=False, compare=False)
    mime: str = field(compare=False)

    @classmethod
    def from_data(cls, data: bytes, mime: str, image: Image.Image) -> ImageRef:
        """A reference to ``data`` (an encoded file of type ``mime``) that decodes to ``image``."""
        return cls(hashlib.sha256(data).hexdigest(), image, data, mime)

    @classmethod
    def from_image(cls, image: Image.Image) -> ImageRef:
        """A reference to a picture that has no file yet: it gets a lossless PNG, so the pixels stay exact."""
        rgb = image.convert("RGB")
        buffer = io.BytesIO()
        rgb.save(buffer, "PNG")
        return cls.from_data(buffer.getvalue(), "image/png", rgb)

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; a user turn may carry images."""

    role: Role
    text: str
    images: tuple[ImageRef, ...] = ()


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    # Keep generating past the end-of-sequence token (benchmarks and tests need fixed lengths).
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


# The most answers the batching engine decodes together: beyond a few, attention work per step grows faster
# than the shared weight reads save, and every sequence holds KV cache.
MAX_CONCURRENCY_LIMIT = 64


@dataclass(frozen=True)
class BatchingOptions:
    """The continuous-batching engine's memory and concurrency trade-offs (openvino-genai's scheduler).

    ``kv_cache_gb``: KV cache in whole GB, 0 = sized automatically (room for ~32k tokens, at most a quarter of
    the memory); more keeps more finished conversations reusable and lets more answers run before one waits.
    ``max_batched_tokens``: the most tokens one step computes; a new image's prompt is prefilled in chunks of
    this size between the other answers' tokens (smaller: smoother streams, larger: faster prefill).
    ``image_cache_size``: encoded images kept for follow-ups (each LLaVA-1.5 image: 576 x hidden floats).
    ``concurrency``: answers decoded together (the scheduler's ``max_num_seqs``); more questions wait in turn.
    """

    kv_cache_gb: int = 0
    max_batched_tokens: int = 256
    image_cache_size: int = 16
    concurrency: int = 4

    def problem(self) -> tuple[str, str] | None:
        """The first bad option as ``(field, what is wrong)``, or None."""
        if self.kv_cache_gb < 0:
            return "kv_cache_gb", f"must be a whole number of GB, or 0 to size it automatically, got {self.kv_cache_gb}"
        if not 1 <= self.concurrency <= MAX_CONCURRENCY_LIMIT:
            return "concurrency", f"must be between 1 and {MAX_CONCURRENCY_LIMIT}, got {self.concurrency}"
        if self.max_batched_tokens < max(16, self.concurrency):
            return "max_batched_tokens", (
                f"must be at least 16 and at least the concurrency ({self.concurrency}), got {self.max_batched_tokens}"
            )
        if self.image_cache_size < 0:
            return "image_cache_size", f"must be 0 (no cache) or more images, got {self.image_cache_size}"
        return None


class EngineError(RuntimeError):
    """A failure worth telling the person about; ``str(error)`` is a plain sentence."""


class ContextTooLong(EngineError):
    """The prompt does not fit the model's context window."""


@dataclass
class GenerationStats:
    """Timings of one finished generation (seconds, monotonic clock)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    started: float = 0.0
    first_token: float | None = None
    finished: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def decode_tokens_per_second(self) -> float | None:
        if self.first_token is None or self.finished is None or self.new_tokens < 2:
            return None
        elapsed = self.finished - self.first_token
        return (self.new_tokens - 1) / elapsed if elapsed > 0 else None


_DONE = object()


class TextStream:
    """An async iterator over the text pieces of one generation, fed from a worker thread.

    The worker calls :meth:`push` for every piece and :meth:`finish` once; :meth:`cancel` (from the
    event loop) raises a flag the worker polls after every token, so generation stops within a token
    or two and the engine is free for the next request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.stats = GenerationStats()
        self.done = loop.create_future()
        # Monotonic time of the last new token (0: none yet); the supervisor's watchdog reads it.
        self.last_progress = 0.0

    # --- worker-thread side -------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def touch(self) -> None:
        """Note that generation made progress (a new token), even if it released no text yet."""
        self.last_progress = time.monotonic()

    def push(self, piece: str) -> None:
        if piece:
            self.touch()
            self._loop.call_soon_threadsafe(self._queue.put_nowait, piece)

    def finish(self, error: BaseException | None = None) -> None:
        def _finish() -> None:
            self._queue.put_nowait(error if error is not None else _DONE)
            if not self.done.done():
                self.done.set_result(None)

        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody is listening
            self._loop.call_soon_threadsafe(_finish)

    # --- event-loop side ----------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask generation to stop; the stream then ends after at most a few more pieces."""
        self._cancelled.set()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, str)
                yield item
        finally:
            # Leaving the loop early (break, exception, task cancelled) must free the engine.
            self.cancel()

    async def text(self) -> str:
        """Collect the whole answer."""
        return "".join([piece async for piece in self])


class Engine(abc.ABC):
    """A loaded model folder that turns conversations into streams of text."""

    name: str = "engine"
    # How many generations may run at once (continuous batching engines take more than one).
    max_concurrency: int = 1
    # False for an engine that loads no converted precision folder (the remote one, a test's engine): the bot
    # then neither converts a model at start nor asks for a complete folder.
    needs_model_folder: ClassVar[bool] = True
    # Heavy modules the engine imports while loading; the benchmark imports them before timing the load.
    imports_on_load: ClassVar[tuple[str, ...]] = ()
    # True for an engine whose constructor takes ``options=BatchingOptions`` (KV cache, batch, concurrency).
    takes_batching_options: ClassVar[bool] = False

    def __init__(self, model_dir: str, device: str = "CPU", ov_config: dict[str, str] | None = None) -> None:
        self.model_dir = model_dir
        self.device = device
        self.ov_config = dict(ov_config or {})

    @abc.abstractmethod
    def generate(self, conversation: Sequence[Turn], settings: GenerationSettings) -> TextStream:
        """Start generating the assistant's next turn; must be called on the event loop."""

    @abc.abstractmethod
    def count_prompt_tokens(self, conversation: Sequence[Turn]) -> int:
        """Tokens the rendered prompt takes, images included (used to fit history in the context)."""

    @property
    @abc.abstractmethod
    def context_window(self) -> int:
        """Maximum number of tokens (prompt and answer) the language model handles."""

    def close(self) -> None:  # noqa: B027 - engines without resources need nothing here
        """Free the model; called once no stream uses it any more."""

    def failure(self) -> str | None:
        """Why this engine can no longer answer (for the log and /status), or None while it can.

        In-process engines fail per answer (an exception ends that answer) and never as a whole.
        """
        return None

    def kill(self) -> bool:
        """Stop at once, abandoning the answers in progress; False when that is impossible (a thread in
        this process can't be stopped from outside)."""
        return False


def start_worker(name: str, target: Callable[[], None]) -> threading.Thread:
    """Run blocking inference on a daemon thread so the event loop never waits for it."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread

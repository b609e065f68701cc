"""Every message between the bot's process and the batching worker, as typed, picklable values.

The parent sends :class:`WorkerOptions` once, then :data:`ToWorker` messages; the worker answers
:data:`Ready` or :data:`Failed` once, then :data:`FromWorker` messages. :func:`receive` checks what arrives,
so both ends of the pipe are checked by mypy and a stray value fails loudly instead of being misread.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from bot.engine.base import EngineError, GenerationSettings


@dataclass(frozen=True)
class WorkerOptions:
    """Everything the child process needs to build the pipeline (plain data, picklable)."""

    model_dir: str
    device: str
    ov_config: dict[str, str]
    kv_cache_gb: int
    max_batched_tokens: int
    image_cache_size: int
    max_sequences: int  # answers decoded together; more wait in the scheduler's queue
    image_token_id: int | None  # set when the parent builds the input embeddings' ids (LLaVA-1.5)


@dataclass(frozen=True)
class EmbedInputs:
    """A LLaVA-1.5 prompt as the reference builds it: token ids with image tokens expanded, and the pixels
    of each image with the digest (the image file's SHA-256) that names its features in the child's cache."""

    input_ids: np.ndarray  # int64 [1, T]
    images: tuple[tuple[str, np.ndarray], ...]  # (digest, float32 [1, 3, H, W])


@dataclass(frozen=True)
class PromptInputs:
    """A prompt with genai image tags, and its images as uint8 HWC arrays (genai encodes them)."""

    prompt: str
    images: tuple[np.ndarray, ...]


Inputs = EmbedInputs | PromptInputs


# --- parent to worker -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Add:
    """Start generating for ``request_id``."""

    request_id: int
    inputs: Inputs
    settings: GenerationSettings


@dataclass(frozen=True)
class Stop:
    """The answer was cancelled: stop it, or drop it if it has not started."""

    request_id: int


@dataclass(frozen=True)
class Close:
    """End the active answers and exit."""


ToWorker = Add | Stop | Close


# --- worker to parent -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """The pipeline is built; requests may come."""


@dataclass(frozen=True)
class Failed:
    """The pipeline could not be built; ``detail`` says why. The worker exits after sending it."""

    detail: str


@dataclass(frozen=True)
class Update:
    """One request's progress: its new token ids, and once ``finished`` its error (None: a normal end) and
    how many tokens its prompt took (0 when unknown)."""

    request_id: int
    new_ids: tuple[int, ...] = ()
    finished: bool = False
    error: str | None = None
    prompt_tokens: int = 0


@dataclass(frozen=True)
class Updates:
    """What one step (or one event) produced, for any number of requests."""

    updates: tuple[Update, ...]


@dataclass(frozen=True)
class Images:
    """For one request's images: how many the vision encoder ran on, and how many came from its cache."""

    encoded: int
    reused: int


FromWorker = Updates | Images
Started = Ready | Failed


def ended(request_id: int, error: str | None = None) -> Update:
    """The last update of a request that ends without (further) tokens."""
    return Update(request_id, finished=True, error=error)


def describe(error: BaseException) -> str:
    """A failure as the sentence the person reads (an EngineError already is one)."""
    if isinstance(error, EngineError):
        return str(error)
    return f"The model failed while answering ({error.__class__.__name__})."


def _unexpected(message: object) -> TypeError:
    return TypeError(f"Unexpected message from the other process: {type(message).__name__}")


class ParentEnd:
    """The bot's end of the pipe. ``recv`` raises EOFError or OSError once the worker is gone."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def send(self, message: WorkerOptions | ToWorker) -> None:
        self.conn.send(message)

    def poll(self, timeout: float) -> bool:
        return self.conn.poll(timeout)

    def started(self) -> Started:
        """The worker's first word: whether it could build the pipeline."""
        message = self.conn.recv()
        if isinstance(message, Ready | Failed):
            return message
        raise _unexpected(message)

    def recv(self) -> FromWorker:
        message = self.conn.recv()
        if isinstance(message, Updates | Images):
            return message
        raise _unexpected(message)

    def close(self) -> None:
        self.conn.close()


class WorkerEnd:
    """The worker's end of the pipe. ``recv`` raises EOFError or OSError once the bot is gone."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def options(self) -> WorkerOptions:
        """The parent's first word: how to build the pipeline."""
        message = self.conn.recv()
        if isinstance(message, WorkerOptions):
            return message
        raise _unexpected(message)

    def send(self, message: Started | FromWorker) -> None:
        self.conn.send(message)

    def poll(self) -> bool:
        return self.conn.poll()

    def recv(self) -> ToWorker:
        message = self.conn.recv()
        if isinstance(message, Add | Stop | Close):
            return message
        raise _unexpected(message)

"""The remote engine: answers streamed from an OpenAI-compatible chat-completions server.

The server may be OpenVINO Model Server, ``llava-bot serve``, vLLM, llama.cpp's server or Ollama; it
batches the questions of every bot process that uses it. The engine speaks the subset of the protocol
they share: text and ``image_url`` parts (images as base64 ``data:`` URLs), ``max_tokens``,
``temperature``, ``top_p``, streaming by server-sent events with the usage block at the end.

Cancelling a stream cancels its task, which closes the HTTP response: the server sees the client go
and stops generating.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import openai
from openai.types.chat import ChatCompletionMessageParam
from PIL import Image

from bot.engine.base import (
    ContextTooLong,
    Engine,
    EngineError,
    GenerationSettings,
    ImageRef,
    TextStream,
    Turn,
)

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
UNREACHABLE = "The model server can't be reached right now; please try again in a moment."
SLOW = "The model server took too long to answer; please try again in a moment."
REFUSED_KEY = "The model server refused the bot's credentials; the bot's operator needs to check them."
NO_MODEL = "The model server has no model called {model}; the bot's operator needs to check its settings."
REJECTED = "The model server rejected the question ({status})."
SERVER_FAILED = "The model server failed while answering ({status}); please try again in a moment."
BROKE_OFF = "The model server broke off the answer; please try again."
TOO_LONG = "The conversation is too long for the model's context window; /reset starts a new one."
NO_KEY = "model.api_key_env names {variable}, but that environment variable is not set."

# Connection failures before the first token are retried after these pauses (seconds).
RETRY_DELAYS = (0.5, 1.0, 2.0)
# Gateway errors mean the server (or a proxy in front of it) could not take the request: worth a retry.
RETRY_STATUSES = frozenset({502, 503, 504})
HEALTH_TIMEOUT = 2.0
# Rough costs for estimating a prompt without a tokenizer: characters per token, the tokens one image
# expands to in LLaVA-1.5 (576) with some margin, and the template's tokens around each turn.
_CHARS_PER_TOKEN = 3
_IMAGE_TOKENS = 600
_TURN_TOKENS = 8
# Image formats every server above decodes; others are re-encoded losslessly as PNG.
_SENT_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png"}
# Without a key the client still sends a bearer token; servers without authentication ignore it.
_NO_KEY = "no-key"


@dataclass(frozen=True)
class RemoteSettings:
    """Where the server is and how to talk to it."""

    base_url: str
    model: str
    api_key_env: str = ""
    timeout: float = 60.0
    # Used when neither a local tokenizer nor the server says how long the context is.
    context_window: int = 4096
    # A converted precision folder whose tokenizer counts prompt tokens exactly (optional).
    tokenizer_dir: Path | None = None


def image_url(ref: ImageRef) -> str:
    """A base64 ``data:`` URL of the image: its stored file as it is when every server reads that format,
    else a lossless PNG of the picture."""
    # The header says what the file is: a phone's JPEG with a second picture (MPO) is stored as
    # image/jpeg, but servers may read it differently, so it goes as PNG like other formats.
    with contextlib.suppress(Exception), Image.open(io.BytesIO(ref.data)) as opened:
        mime = _SENT_AS_IS.get(str(opened.format))
        if mime is not None:
            return f"data:{mime};base64,{base64.b64encode(ref.data).decode('ascii')}"
    buffer = io.BytesIO()
    ref.image.convert("RGB").save(buffer, "PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def chat_messages(conversation: Sequence[Turn]) -> list[dict[str, Any]]:
    """The conversation as chat-completions messages; a turn's images come before its text, as the
    local engines' chat template puts them."""
    messages: list[dict[str, Any]] = []
    for turn in conversation:
        if not turn.images:
            messages.append({"role": turn.role, "content": turn.text})
            continue
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_url(i)}} for i in turn.images]
        parts.append({"type": "text", "text": turn.text})
        messages.append({"role": turn.role, "content": parts})
    return messages


def estimate_tokens(conversation: Sequence[Turn]) -> int:
    """A generous guess of a prompt's length when no tokenizer is at hand."""
    return sum(len(t.text) // _CHARS_PER_TOKEN + 1 + _TURN_TOKENS + _IMAGE_TOKENS * len(t.images) for t in conversation)


class _RemoteStream(TextStream):
    """A text stream whose cancel also cancels the request's task, closing the HTTP stream."""

    task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()


class RemoteEngine(Engine):
    """Streams answers from an OpenAI-compatible server; holds no model in this process."""

    name = "openai"
    needs_model_folder = False
    # The server batches and queues on its own; this bounds what one bot process keeps in flight.
    max_concurrency = 8

    def __init__(self, settings: RemoteSettings) -> None:
        super().__init__(str(settings.tokenizer_dir or ""), device="remote")
        self.settings = settings
        api_key = _NO_KEY
        if settings.api_key_env:
            api_key = os.environ.get(settings.api_key_env, "")
            if not api_key:
                raise EngineError(NO_KEY.format(variable=settings.api_key_env))
        self._api_key = api_key
        # Retries are ours: only connection failures before the first token are worth repeating.
        self._client = openai.AsyncOpenAI(
            base_url=settings.base_url, api_key=api_key, timeout=settings.timeout, max_retries=0
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.template: Any = None
        if settings.tokenizer_dir is not None:
            from bot.engine.template import ChatTemplate

            self.template = ChatTemplate(settings.tokenizer_dir)
            self._context_window = int(self.template.context_window)
            log.info("Prompt tokens are counted with the tokenizer of %s", settings.tokenizer_dir)
        else:
            self._context_window = self._server_context_window() or settings.context_window
            log.warning(
                "No local tokenizer for the remote model %s (model.dir has no converted folder): prompt lengths "
                "are estimated, and the context window is taken as %d tokens",
                settings.model,
                self._context_window,
            )
        log.info("Remote engine: model %s at %s", settings.model, settings.base_url)

    def _server_context_window(self) -> int | None:
        """The context length the server lists for the model (vLLM and ``llava-bot serve`` say
        ``max_model_len``), or None. Blocking: runs while the engine loads, off the event loop."""
        client = openai.OpenAI(
            base_url=self.settings.base_url, api_key=self._api_key, timeout=min(self.settings.timeout, 10.0),
            max_retries=0,
        )  # fmt: skip
        try:
            models = list(client.models.list())
        except openai.OpenAIError as error:
            log.warning("The model server at %s did not list its models: %s", self.settings.base_url, error)
            return None
        finally:
            client.close()
        for entry in models:
            if entry.id == self.settings.model:
                length = getattr(entry, "max_model_len", None)
                return int(length) if isinstance(length, int) and length > 0 else None
        log.warning("The model server at %s does not list %s", self.settings.base_url, self.settings.model)
        return None

    @property
    def context_window(self) -> int:
        return self._context_window

    def count_prompt_tokens(self, conversation: Sequence[Turn]) -> int:
        if self.template is not None:
            return int(self.template.count_tokens(conversation))
        return estimate_tokens(conversation)

    # --- generating ----------------------------------------------------------------------------------
    def generate(self, conversation: Sequence[Turn], settings: GenerationSettings) -> TextStream:
        loop = asyncio.get_running_loop()
        self._loop = loop
        stream = _RemoteStream(loop)
        stream.stats.started = time.monotonic()
        task = loop.create_task(self._run(tuple(conversation), settings, stream))
        stream.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream

    async def _run(self, conversation: tuple[Turn, ...], settings: GenerationSettings, stream: TextStream) -> None:
        error: BaseException | None = None
        try:
            # Base64 of a few megabytes of images is worth keeping off the event loop.
            messages = await asyncio.to_thread(chat_messages, conversation)
            await self._answer(messages, settings, stream)
        except asyncio.CancelledError:
            pass  # Stop, delete, reset or shutdown: the response is closed, the stream simply ends
        except EngineError as failure:
            error = failure
        except Exception:
            log.exception("The remote answer from %s failed", self.settings.base_url)
            error = EngineError(BROKE_OFF)
        finally:
            stream.stats.finished = time.monotonic()
            stream.finish(error)

    async def _answer(self, messages: list[dict[str, Any]], settings: GenerationSettings, stream: TextStream) -> None:
        """Stream one answer, retrying connection failures that happen before the first token."""
        for attempt in range(len(RETRY_DELAYS) + 1):
            try:
                await self._stream_once(messages, settings, stream)
                return
            except openai.APITimeoutError as error:
                log.warning("The model server at %s timed out: %s", self.settings.base_url, error)
                raise EngineError(SLOW) from error
            except (openai.APIConnectionError, openai.InternalServerError) as error:
                status = getattr(error, "status_code", None)
                retryable = status is None or status in RETRY_STATUSES
                if stream.stats.first_token is not None:
                    log.warning("The model server at %s broke off an answer: %r", self.settings.base_url, error)
                    raise EngineError(BROKE_OFF) from error
                if not retryable or attempt == len(RETRY_DELAYS):
                    raise self._sentence(error) from error
                log.info(
                    "The model server at %s failed (%s); retrying in %.1f s",
                    self.settings.base_url,
                    status or error.__class__.__name__,
                    RETRY_DELAYS[attempt],
                )
                await asyncio.sleep(RETRY_DELAYS[attempt])
            except openai.APIError as error:
                raise self._sentence(error) from error

    async def _stream_once(
        self, messages: list[dict[str, Any]], settings: GenerationSettings, stream: TextStream
    ) -> None:
        extra: dict[str, Any] = {"ignore_eos": True} if settings.ignore_eos else {}
        response = await self._client.chat.completions.create(
            model=self.settings.model,
            messages=cast("list[ChatCompletionMessageParam]", messages),
            max_tokens=settings.max_new_tokens,
            temperature=max(settings.temperature, 0.0),
            top_p=settings.top_p,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra or None,
        )
        pieces = 0
        async with response:
            async for chunk in response:
                if chunk.usage is not None:
                    stream.stats.prompt_tokens = chunk.usage.prompt_tokens
                    stream.stats.new_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    piece = choice.delta.content if choice.delta else None
                    if piece:
                        if stream.stats.first_token is None:
                            stream.stats.first_token = time.monotonic()
                        pieces += 1
                        stream.push(piece)
        if not stream.stats.new_tokens:
            stream.stats.new_tokens = pieces  # a server without a usage block: one piece is about one token

    def _sentence(self, error: openai.APIError) -> EngineError:
        """The one sentence for the person, with the server's own words in the log."""
        status = getattr(error, "status_code", None)
        log.warning(
            "The model server at %s answered %s: %s", self.settings.base_url, status or "nothing", error.message
        )
        if isinstance(error, openai.APIConnectionError):
            return EngineError(UNREACHABLE)
        if status in (401, 403):
            return EngineError(REFUSED_KEY)
        if status == 404:
            return EngineError(NO_MODEL.format(model=self.settings.model))
        if status is not None and 400 <= status < 500:
            body = error.body if isinstance(error.body, dict) else {}
            text = f"{body.get('code', '')} {error.message}".lower()
            if "context" in text or "too long" in text or "too many tokens" in text:
                return ContextTooLong(TOO_LONG)
            return EngineError(REJECTED.format(status=status))
        if status is not None:
            return EngineError(SERVER_FAILED.format(status=status))
        return EngineError(BROKE_OFF)

    # --- health and shutdown ---------------------------------------------------------------------------
    async def health(self) -> str:
        """A short description of the server's state for ``/status``."""
        try:
            # /status must answer within Discord's 3 s.
            models = await self._client.with_options(timeout=HEALTH_TIMEOUT).models.list()
        except openai.OpenAIError as error:
            log.info("Health check of %s failed: %s", self.settings.base_url, error)
            return "unreachable"
        names = [entry.id for entry in models.data]
        return "up" if self.settings.model in names else f"up, but it does not list {self.settings.model}"

    def close(self) -> None:
        """Cancel what still streams and close the HTTP client (called off the event loop)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def shut() -> None:
            for task in list(self._tasks):
                task.cancel()
            await self._client.close()

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(shut())
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), loop).result(10)

"""``llava-bot serve``: one converted precision folder behind the OpenAI-compatible API.

Routes (each under ``/v3``, as OpenVINO Model Server has them, and ``/v1``): ``POST chat/completions``
(whole answers, or server-sent events with ``stream``), ``GET models`` and ``GET models/{name}``; and
``GET /health`` with the counters an operator (or a test) watches. The engine is one of the local ones,
by default ``genai-batching``, so several bot processes share one batch. A client that disconnects
cancels its generation: the handler is cancelled and the engine's stream with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from bot.engine import variants
from bot.engine.base import BatchingOptions, ContextTooLong, Engine, EngineError, TextStream
from bot.engine.manager import load_engine
from bot.serve.protocol import (
    ApiError,
    ChatRequest,
    chunk,
    completion,
    invalid,
    model_entry,
    parse_chat_request,
    usage,
    usage_chunk,
)

log = logging.getLogger(__name__)

# Base64 images make bodies large: room for a 10 MB image (the bot's default limit) and some history.
MAX_BODY = 32 * 1024 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def default_name(folder: Path) -> str:
    """The model name clients ask for: ``llava-1.5-7b-hf-int4`` for ``models/llava-1.5-7b-hf/INT4``."""
    folder = folder.resolve()
    if folder.name.upper() in variants.PRECISIONS:
        return f"{folder.parent.name}-{folder.name}".lower()
    return folder.name.lower()


@dataclass
class _Generation:
    """One accepted request and its engine stream."""

    request_id: str
    parsed: ChatRequest
    stream: TextStream
    prompt_tokens: int
    max_new: int

    def usage(self) -> dict[str, int]:
        return usage(self.stream.stats.prompt_tokens or self.prompt_tokens, self.stream.stats.new_tokens)

    def finish_reason(self) -> str:
        return "length" if self.stream.stats.new_tokens >= self.max_new else "stop"


class ModelServer:
    """The HTTP side of one loaded engine."""

    def __init__(self, engine: Engine, name: str, api_key: str | None = None) -> None:
        self.engine = engine
        self.name = name
        self._api_key = api_key
        self._created = int(time.time())
        self._slots = asyncio.Semaphore(engine.max_concurrency)
        # requests, completed, cancelled (client went away), failed, rejected; tokens generated.
        self.counters: collections.Counter[str] = collections.Counter()
        self.active = 0

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=MAX_BODY)
        for prefix in ("/v3", "/v1"):
            app.router.add_post(f"{prefix}/chat/completions", self.chat)
            app.router.add_get(f"{prefix}/models", self.models)
            app.router.add_get(f"{prefix}/models/{{name}}", self.model)
        app.router.add_get("/health", self.health)
        return app

    # --- middleware ----------------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as error:
            self.counters["rejected"] += 1
            log.info("%s %s refused (%d): %s", request.method, request.path, error.status, error.message)
            return web.json_response(error.body(), status=error.status)
        except web.HTTPException as error:  # unknown route, wrong method, body too large
            body = ApiError(error.status, error.reason, error.reason.lower().replace(" ", "_")).body()
            return web.json_response(body, status=error.status)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._api_key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self._api_key}".encode()):
                raise ApiError(401, "Incorrect or missing API key.", "invalid_api_key")
        return await handler(request)

    # --- routes --------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        """Liveness and counters: active generations, requests by outcome, tokens generated."""
        return web.json_response(
            {"status": "ok", "model": self.name, "engine": self.engine.name, "active": self.active, **self.counters}
        )

    async def models(self, request: web.Request) -> web.Response:
        entry = model_entry(self.name, self._created, self.engine.context_window)
        return web.json_response({"object": "list", "data": [entry]})

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["name"])
        return web.json_response(model_entry(self.name, self._created, self.engine.context_window))

    def _check_model(self, name: object) -> None:
        if name != self.name:
            message = f"The model '{name}' does not exist; this server serves '{self.name}'."
            raise ApiError(404, message, "model_not_found")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v3/chat/completions``."""
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise invalid("The request body is not valid JSON.") from error
        self._check_model(body.get("model") if isinstance(body, dict) else None)
        # Decoding images takes a while for large ones: off the event loop.
        parsed = await asyncio.to_thread(parse_chat_request, body)
        prompt_tokens = await asyncio.to_thread(self.engine.count_prompt_tokens, parsed.conversation)
        max_new = self._answer_budget(parsed, prompt_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.counters["requests"] += 1
        async with self._slots:
            job = _Generation(request_id, parsed, self._start(parsed, max_new), prompt_tokens, max_new)
            try:
                return await (self._streamed(request, job) if parsed.stream else self._whole(job))
            except (asyncio.CancelledError, ConnectionResetError):
                self.counters["cancelled"] += 1
                log.info("Request %s: the client went away; its generation was stopped", request_id)
                raise
            finally:
                job.stream.cancel()  # frees the engine if the answer did not run to its end

    def _answer_budget(self, parsed: ChatRequest, prompt_tokens: int) -> int:
        window = self.engine.context_window
        max_new = parsed.max_tokens if parsed.max_tokens is not None else window - prompt_tokens
        if max_new < 1 or prompt_tokens + max_new > window:
            raise ApiError(
                400,
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt_tokens + max(max_new, 1)} tokens ({prompt_tokens} in the messages, "
                f"{max(max_new, 1)} in the completion).",
                "context_length_exceeded",
            )
        return max_new

    def _start(self, parsed: ChatRequest, max_new: int) -> TextStream:
        stream = self.engine.generate(parsed.conversation, parsed.settings(max_new))
        self.active += 1

        def ended(_: object) -> None:
            # The engine's own end of the generation (not the handler's): what "stopped generating" means.
            self.active -= 1
            self.counters["tokens"] += stream.stats.new_tokens

        stream.done.add_done_callback(ended)
        return stream

    async def _whole(self, job: _Generation) -> web.Response:
        try:
            text = await job.stream.text()
        except EngineError as error:
            raise self._engine_failure(job.request_id, error) from error
        self.counters["completed"] += 1
        return web.json_response(completion(job.request_id, self.name, text, job.finish_reason(), job.usage()))

    async def _streamed(self, request: web.Request, job: _Generation) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        with_usage = job.parsed.include_usage
        request_id = job.request_id

        async def send(data: dict[str, Any] | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            await response.write(f"data: {text}\n\n".encode())

        await send(chunk(request_id, self.name, {"role": "assistant", "content": ""}, with_usage=with_usage))
        try:
            async for piece in job.stream:
                await send(chunk(request_id, self.name, {"content": piece}, with_usage=with_usage))
        except EngineError as error:
            # The status line is gone already: the error travels as an event, as OpenAI's servers send it.
            await send(self._engine_failure(request_id, error).body())
            await response.write_eof()
            return response
        await send(chunk(request_id, self.name, {}, job.finish_reason(), with_usage=with_usage))
        if with_usage:
            await send(usage_chunk(request_id, self.name, job.usage()))
        await send("[DONE]")
        await response.write_eof()
        self.counters["completed"] += 1
        return response

    def _engine_failure(self, request_id: str, error: EngineError) -> ApiError:
        self.counters["failed"] += 1
        log.warning("Request %s failed: %s", request_id, error)
        if isinstance(error, ContextTooLong):
            return ApiError(400, str(error), "context_length_exceeded")
        return ApiError(503 if "busy" in str(error) else 500, str(error), "engine_error")


# --- the command ---------------------------------------------------------------------------------------
async def serve(
    folder: Path,
    *,
    name: str,
    host: str,
    port: int,
    kind: str,
    device: str,
    ov_config: dict[str, str],
    api_key: str | None,
    batching: BatchingOptions | None = None,
) -> None:
    """Load the engine, serve until SIGINT or SIGTERM, then close both cleanly."""
    started = time.monotonic()
    engine = await asyncio.to_thread(load_engine, kind, folder, device, ov_config, batching)
    log.info("Loaded %s with the %s engine in %.1f s", folder, kind, time.monotonic() - started)
    server = ModelServer(engine, name, api_key)
    runner = web.AppRunner(server.application(), handler_cancellation=True)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("Serving %s at http://%s:%d/v3 (and /v1)%s", name, host, port, ", API key required" if api_key else "")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("Stopping: %d generation(s) still running are cancelled", server.active)
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        await asyncio.to_thread(engine.close)

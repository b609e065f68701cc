"""Owns the loaded engine: loads a precision variant, switches variants at run time, closes them."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bot.engine import variants
from bot.engine.base import BatchingOptions, Engine, EngineError, GenerationSettings, TextStream, Turn
from bot.engine.supervisor import Backoff, Health, Supervisor

if TYPE_CHECKING:
    from bot.engine.remote import RemoteSettings

log = logging.getLogger(__name__)

# The engine that streams from an OpenAI-compatible server; it takes the model.base_url family of settings.
REMOTE_KIND = "openai"
# The engines, by the name config, the CLI and the benchmark use, as "module:Class". Adding an engine is one
# module and one line here; modules are imported only when their engine is chosen, so the genai engines never
# import what optimum needs. A class is built as ``Class(model_dir, device, ov_config)``, except the remote one.
ENGINES: dict[str, str] = {
    "genai": "bot.engine.genai:GenaiEngine",
    "genai-batching": "bot.engine.batching:BatchingEngine",
    "optimum": "bot.engine.optimum:OptimumEngine",
    REMOTE_KIND: "bot.engine.remote:RemoteEngine",
}


def local_engines() -> list[str]:
    """The registered engines that run the model in this process (every one but the remote engine)."""
    return [name for name in ENGINES if name != REMOTE_KIND]


def engine_class(kind: str) -> type[Engine]:
    """The class registered as ``kind`` (imports its module, which imports nothing heavy until loading)."""
    if kind not in ENGINES:
        raise EngineError(f"Unknown engine {kind!r}; choose one of {', '.join(ENGINES)}.")
    module_name, class_name = ENGINES[kind].split(":")
    found: type[Engine] = getattr(importlib.import_module(module_name), class_name)
    return found


def needs_model_folder(kind: str) -> bool:
    """Whether the named engine loads a converted folder (an unknown engine is refused when it is loaded)."""
    return kind not in ENGINES or engine_class(kind).needs_model_folder


def load_engine(
    kind: str,
    folder: Path,
    device: str = "CPU",
    ov_config: dict[str, str] | None = None,
    batching: BatchingOptions | None = None,
) -> Engine:
    """Load one precision folder with the named engine (blocking: call it off the event loop).

    ``batching`` tunes the engines that batch (``takes_batching_options``) and is ignored by the others.
    """
    if kind == REMOTE_KIND:
        raise EngineError(f"The {kind} engine talks to a server and loads no folder; choose a local engine.")
    engine = engine_class(kind)
    if engine.needs_model_folder and not variants.is_complete(folder):
        raise EngineError(f"Cannot load the model: {variants.describe_missing(folder)}.")
    if batching is not None and engine.takes_batching_options:
        return engine(str(folder), device, ov_config, options=batching)  # type: ignore[call-arg]
    return engine(str(folder), device, ov_config)


class ModelManager:
    """The bot-wide model: one precision loaded at a time, switchable without a restart.

    A switch loads the new variant beside the old one, then swaps; requests already streaming
    finish on the old variant, which is closed once the last of them ends. A :class:`Supervisor` keeps the
    loaded variant alive: a dead or stuck engine is reloaded at the same precision, and questions asked
    meanwhile wait for it.
    """

    def __init__(
        self,
        model_dir: Path,
        kind: str = "genai",
        device: str = "CPU",
        ov_config: dict[str, str] | None = None,
        *,
        stall_timeout: float = 120.0,
        backoff: Backoff | None = None,
        remote: RemoteSettings | None = None,
        remote_models: dict[str, str] | None = None,
        batching: BatchingOptions | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.kind = kind
        # For the remote engine: the server, and the server's model name for each precision (empty: the
        # server decides, and remote.model is the only model).
        self.remote = remote
        self.remote_models = {variants.normalise_precision(p): name for p, name in (remote_models or {}).items()}
        self.device = device
        self.ov_config = dict(ov_config or {})
        self.batching = batching
        self.precision: str | None = None
        self._engine: Engine | None = None
        self._in_flight: dict[int, int] = {}
        self._closing: set[Engine] = set()
        self._switch_lock = asyncio.Lock()
        self.supervisor = Supervisor(self._reload, stall_timeout=stall_timeout, backoff=backoff)

    def available(self) -> list[str]:
        """Complete precision variants under the model folder (remote: the precisions the server maps)."""
        if self.remote is not None:
            return [p for p in variants.PRECISIONS if p in self.remote_models]
        if not needs_model_folder(self.kind):
            return list(variants.PRECISIONS)
        return variants.available(self.model_dir)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise EngineError("The model is not loaded yet.")
        return self._engine

    @property
    def healthy(self) -> bool:
        """Whether the loaded engine can answer now (False while it is dead or restarting)."""
        return self._engine is not None and self.supervisor.check()

    @property
    def health(self) -> Health:
        """Up since, restarts and last failure, for ``/status``."""
        return self.supervisor.health

    async def switch(self, precision: str) -> None:
        """Load ``precision`` and make it the one new requests use; reloads it when the engine is broken."""
        precision = variants.normalise_precision(precision)
        async with self._switch_lock:
            if precision == self.precision and self.healthy:
                return
            await self._load(precision)

    async def _reload(self) -> None:
        """The supervisor's restart: load the current precision afresh, unless a switch already did."""
        async with self._switch_lock:
            if self.precision is not None and not self.healthy:
                await self._load(self.precision)

    async def _load(self, precision: str) -> None:
        engine = await asyncio.to_thread(self._build, precision)
        old, self._engine, self.precision = self._engine, engine, precision
        self.supervisor.started(engine)
        if old is not None:
            self._retire(old)

    def _build(self, precision: str) -> Engine:
        """Make the engine for ``precision`` (blocking: runs off the event loop)."""
        folder = self.model_dir / precision
        if self.remote is not None:
            from bot.engine.remote import RemoteEngine

            settings = dataclasses.replace(
                self.remote,
                model=self.remote_models.get(precision, self.remote.model),
                tokenizer_dir=folder if variants.is_complete(folder) else None,
            )
            log.info("Using %s at %s (%s engine)", settings.model, settings.base_url, self.kind)
            return RemoteEngine(settings)
        log.info("Loading %s (%s engine on %s)", folder, self.kind, self.device)
        return load_engine(self.kind, folder, self.device, self.ov_config, self.batching)

    def _retire(self, engine: Engine) -> None:
        # Called at the switch and again as each of its streams ends; the last one closes it.
        if engine in self.supervisor.abandoned:
            self._in_flight.pop(id(engine), None)  # its thread is stuck: closing would wait for ever
            return
        if self._in_flight.get(id(engine), 0) == 0 and engine not in self._closing:
            self._closing.add(engine)
            self._in_flight.pop(id(engine), None)
            asyncio.get_running_loop().run_in_executor(None, engine.close)

    def generate(self, conversation: Sequence[Turn], settings: GenerationSettings) -> TextStream:
        """Start a generation on the current variant; it keeps that variant until it ends.

        While the engine restarts, the returned stream waits for it (or ends with a sentence when it can't
        start); the time spent waiting doesn't count towards the stall timeout.
        """
        if self._engine is not None and not self.supervisor.check():
            return self.supervisor.relay(lambda: self._start(conversation, settings))
        return self._start(conversation, settings)

    def _start(self, conversation: Sequence[Turn], settings: GenerationSettings) -> TextStream:
        engine = self.engine
        stream = engine.generate(conversation, settings)
        key = id(engine)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

        def _done(_: object) -> None:
            self._in_flight[key] = self._in_flight.get(key, 1) - 1
            if engine is not self._engine:
                self._retire(engine)

        stream.done.add_done_callback(_done)
        self.supervisor.watch(engine, stream)
        return stream

    @property
    def concurrency(self) -> int:
        """Generations the loaded engine runs at once."""
        return self.engine.max_concurrency

    def count_prompt_tokens(self, conversation: Sequence[Turn]) -> int:
        return self.engine.count_prompt_tokens(conversation)

    @property
    def context_window(self) -> int:
        return self.engine.context_window

    async def close(self) -> None:
        """Close the current engine (at shutdown, after requests were cancelled)."""
        await self.supervisor.close()
        if self._engine is not None and self._engine not in self.supervisor.abandoned:
            engine, self._engine = self._engine, None
            await asyncio.to_thread(engine.close)

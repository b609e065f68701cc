"""The engine's keeper: notices a dead or stuck engine, ends its answers with a sentence and restarts it.

One job, kept apart from loading and switching precisions (``ModelManager``): the supervisor

* polls the current engine's health (``Engine.failure()``: the batching engine's worker process died, was
  killed by the OOM killer or crashed) and every answer's progress (``TextStream.last_progress``);
* ends the answers of a failed engine with one sentence, kills what can be killed, and asks for a freshly
  loaded engine with exponential backoff (1 s, 2 s, 4 s ... at most 60 s);
* holds new questions until an engine is ready again (:meth:`Supervisor.relay`), or gives them a sentence
  when restarts keep failing; so the chat service never sees a dead engine, at worst a sentence;
* keeps the health that ``/status`` shows: up since, restarts, last failure.

A stuck answer of an in-process engine (``genai``, ``optimum``) runs on a thread that Python can't stop. Its
answer is ended, the thread is told to stop at its next token, and the engine is replaced by a freshly
loaded one; the stuck engine is abandoned rather than closed (closing would wait for the thread for ever),
so its memory stays in use until the thread returns. The ``genai-batching`` engine runs in a child process,
which is killed and so frees everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from bot.engine.base import Engine, EngineError, TextStream

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
INTERRUPTED = "The model stopped unexpectedly; please ask again in a moment."
STALLED = "The model stopped making progress, so I'm restarting it; please ask again in a moment."
CANT_START = "The model can't start right now; the operator has been told in the log."
CLOSING = "The model is shutting down."

State = Literal["starting", "up", "restarting", "down", "closed"]


@dataclass(frozen=True)
class Failure:
    """Why an engine stopped (or a restart failed), and when (seconds since the epoch)."""

    at: float
    reason: str


@dataclass(frozen=True)
class Health:
    """What ``/status`` shows. ``up_since`` is set while an engine is up; ``next_attempt`` while restarting."""

    state: State
    up_since: float | None
    restarts: int
    last_failure: Failure | None
    next_attempt: float | None = None


class Backoff:
    """Delays before restart attempts: ``first``, doubled after each failure, at most ``limit``.

    An engine that stayed up for ``stable`` seconds starts the sequence again, so one crash a day waits one
    second while a crash loop slows down to one attempt a minute.
    """

    def __init__(self, first: float = 1.0, limit: float = 60.0, stable: float = 60.0) -> None:
        self.first = first
        self.limit = limit
        self.stable = stable
        self._failures = 0

    def failed_after(self, uptime: float) -> None:
        """An engine failed after running ``uptime`` seconds."""
        if uptime >= self.stable:
            self._failures = 0

    def next_delay(self) -> float:
        """The delay before the next attempt (each call counts one more attempt)."""
        delay = min(self.limit, self.first * 2**self._failures)
        if delay < self.limit:
            self._failures += 1
        return delay


@dataclass(eq=False)
class _Watch:
    engine: Engine
    stream: TextStream
    since: float  # when the engine got the request: time in the queue before it does not count

    def idle(self, now: float) -> float:
        return now - max(self.since, self.stream.last_progress)


class _Relay(TextStream):
    """The stream a question gets while the engine restarts: it waits, then forwards the real one."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.inner: TextStream | None = None
        self.task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        super().cancel()
        if self.inner is not None:
            self.inner.cancel()
        elif self.task is not None:
            self.task.cancel()


class Supervisor:
    """Keeps the current engine alive; ``restart`` must load a fresh engine and pass it to :meth:`started`."""

    def __init__(
        self,
        restart: Callable[[], Awaitable[None]],
        *,
        stall_timeout: float = 120.0,
        backoff: Backoff | None = None,
        poll: float = 0.5,
        down_after: int = 3,
    ) -> None:
        self._restart = restart
        self.stall_timeout = stall_timeout
        self._backoff = backoff or Backoff()
        self._poll = min(poll, stall_timeout / 4)
        # After this many failed restarts in a row, questions get CANT_START instead of waiting.
        self._down_after = down_after
        self._engine: Engine | None = None
        self._state: State = "starting"
        self._up_since: float | None = None
        self._up_at = 0.0
        self._restarts = 0
        self._failed_attempts = 0
        self._last_failure: Failure | None = None
        self._next_attempt: float | None = None
        self._watched: set[_Watch] = set()
        self._changed = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None
        self._restarter: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Engines whose stuck thread can't be stopped: never closed (close() would wait for that thread).
        self.abandoned: weakref.WeakSet[Engine] = weakref.WeakSet()

    # --- what others read ---------------------------------------------------------------------------
    @property
    def health(self) -> Health:
        """A snapshot for ``/status``."""
        return Health(self._state, self._up_since, self._restarts, self._last_failure, self._next_attempt)

    def check(self) -> bool:
        """Whether the current engine can take a question now; notices a dead engine at once."""
        if self._state == "up" and self._engine is not None:
            reason = self._engine.failure()
            if reason is not None:
                self._fail(self._engine, reason, INTERRUPTED)
        return self._state == "up"

    async def wait_ready(self) -> None:
        """Return once an engine is up; raises EngineError when restarts keep failing or at shutdown."""
        while not self.check():
            if self._state == "down":
                raise EngineError(CANT_START)
            if self._state == "closed":
                raise EngineError(CLOSING)
            await self._changed.wait()

    # --- what the manager tells it ------------------------------------------------------------------
    def started(self, engine: Engine) -> None:
        """``engine`` is now the one that answers (first load, precision switch or restart)."""
        if self._state == "closed":
            return
        if self._state in ("restarting", "down") and self._engine is not None:
            self._restarts += 1
            log.info(
                "The model runs again (restart %d; %d failed attempts before it)", self._restarts, self._failed_attempts
            )
        self._engine = engine
        self._state = "up"
        self._up_since, self._up_at = time.time(), time.monotonic()
        self._failed_attempts = 0
        self._next_attempt = None
        restarter = self._restarter
        if restarter is not None and restarter is not asyncio.current_task():
            restarter.cancel()  # a /precision got there first
        self._restarter = None
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch_loop(), name="engine-supervisor")
        self._notify()

    def watch(self, engine: Engine, stream: TextStream) -> None:
        """Follow the progress of an answer ``engine`` has just been given."""
        watch = _Watch(engine, stream, time.monotonic())
        self._watched.add(watch)
        stream.done.add_done_callback(lambda _: self._watched.discard(watch))

    def relay(self, start: Callable[[], TextStream]) -> TextStream:
        """A stream that waits for the engine to be up, then calls ``start`` and forwards what it yields."""
        outer = _Relay(asyncio.get_running_loop())
        outer.task = asyncio.get_running_loop().create_task(self._forward(outer, start), name="engine-relay")
        self._tasks.add(outer.task)
        outer.task.add_done_callback(self._tasks.discard)
        return outer

    async def close(self) -> None:
        """Stop watching and restarting (at shutdown); waiting questions get a sentence."""
        self._state = "closed"
        self._notify()
        for task in (self._monitor, self._restarter, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._monitor, self._restarter, *self._tasks):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._monitor = self._restarter = None

    # --- internals -----------------------------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _forward(self, outer: _Relay, start: Callable[[], TextStream]) -> None:
        try:
            await self.wait_ready()
            if outer.cancelled:
                outer.finish()
                return
            inner = outer.inner = start()
            async for piece in inner:
                outer.push(piece)
            outer.stats = inner.stats
            outer.finish()
        except asyncio.CancelledError:
            # Cancelled by the person leaving (nothing to say) or by shutdown (say so).
            outer.finish(None if outer.cancelled else EngineError(CLOSING))
        except EngineError as error:
            outer.finish(error)
        except Exception:
            log.exception("Relaying an answer failed")
            outer.finish(EngineError(INTERRUPTED))

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            try:
                self.check()
                self._check_stalls()
            except Exception:
                # The watchdog must outlive any surprise in the engines it watches.
                log.exception("Checking the model's health failed")

    def _check_stalls(self) -> None:
        now = time.monotonic()
        for watch in list(self._watched):
            if watch not in self._watched:
                continue  # ended with its engine a moment ago
            if watch.stream.done.done():
                self._watched.discard(watch)
            elif watch.idle(now) >= self.stall_timeout:
                reason = f"an answer made no progress for {self.stall_timeout:g} s"
                self._fail(watch.engine, reason, STALLED)

    def _fail(self, engine: Engine, reason: str, sentence: str) -> None:
        """End ``engine``'s answers with ``sentence``, stop it, and restart if it was the current one."""
        for watch in [w for w in self._watched if w.engine is engine]:
            self._watched.discard(watch)
            watch.stream.cancel()  # a thread that ever wakes up stops at its next token
            watch.stream.finish(EngineError(sentence))
        if not engine.kill():
            self.abandoned.add(engine)
            log.warning(
                "The %s engine's stuck thread can't be stopped; the engine is replaced and its memory stays in "
                "use until that thread returns",
                engine.name,
            )
        current = engine is self._engine and self._state == "up"
        if not current:
            log.error("A retired %s engine failed: %s", engine.name, reason)
            return
        self._last_failure = Failure(time.time(), reason)
        self._backoff.failed_after(time.monotonic() - self._up_at)
        self._state = "restarting"
        self._up_since = None
        log.error("The model engine (%s) failed: %s; restarting it", engine.name, reason)
        self._restarter = asyncio.get_running_loop().create_task(self._restart_loop(), name="engine-restart")
        self._notify()

    async def _restart_loop(self) -> None:
        while self._state in ("restarting", "down"):
            delay = self._backoff.next_delay()
            self._next_attempt = time.time() + delay
            log.info("Restarting the model in %g s", delay)
            await asyncio.sleep(delay)
            self._next_attempt = None  # loading now
            try:
                await self._restart()
            except Exception as error:
                self._restart_failed(error)
                continue
            if self._state != "up":
                # The restart hook returned without handing over an engine.
                self._restart_failed(EngineError("no engine was loaded"))
                continue
            return

    def _restart_failed(self, error: Exception) -> None:
        self._failed_attempts += 1
        self._last_failure = Failure(time.time(), f"restart failed: {error}")
        log.error(
            "Restarting the model failed (attempt %d): %s",
            self._failed_attempts,
            error,
            exc_info=None if isinstance(error, EngineError) else error,
        )
        if self._failed_attempts >= self._down_after and self._state == "restarting":
            self._state = "down"
            log.error(
                "The model can't start: %d restarts failed in a row (last: %s). Questions get a sentence saying "
                "so until a restart succeeds; retrying at most every %g s",
                self._failed_attempts,
                error,
                self._backoff.limit,
            )
            self._notify()

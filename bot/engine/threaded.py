"""What the engines built on the model folder's chat template share, and the one-thread engines' worker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from bot.engine.base import Engine, EngineError, TextStream, Turn
from bot.engine.template import ChatTemplate


class TemplateEngine(Engine):
    """An engine that renders prompts with the folder's chat template, which also knows the context window."""

    template: ChatTemplate

    @property
    def context_window(self) -> int:
        return self.template.context_window

    def count_prompt_tokens(self, conversation: Sequence[Turn]) -> int:
        return self.template.count_tokens(conversation)


class ThreadedEngine(TemplateEngine):
    """An in-process pipeline that answers one request at a time on a dedicated thread.

    Subclasses build their pipeline after ``super().__init__`` and hand each generation to :meth:`run_alone`.
    """

    def __init__(
        self, model_dir: str, device: str = "CPU", ov_config: dict[str, str] | None = None, *, thread_name: str
    ) -> None:
        super().__init__(model_dir, device, ov_config)
        # Failures are logged under the engine's own module, as each engine did before sharing this.
        self._log = logging.getLogger(type(self).__module__)
        # One worker: the pipeline holds one KV cache (or one stateful request), so requests must take turns.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)

    def run_alone(self, stream: TextStream, generate: Callable[[], None]) -> None:
        """Run ``generate`` on the engine's thread once earlier requests are done, then end ``stream``.

        ``generate`` pushes the text and fills the stats it knows; its exceptions end the stream with a
        sentence for the person. A stream cancelled while it waited ends without running.
        """

        def work() -> None:
            if stream.cancelled:  # cancelled while waiting for the worker
                stream.finish()
                return
            stream.stats.started = time.monotonic()
            try:
                generate()
            except Exception as error:
                self._log.exception("Generation failed in %s", self.model_dir)
                stream.finish(EngineError(f"The model failed while answering ({error.__class__.__name__})."))
                return
            stream.stats.finished = time.monotonic()
            stream.finish()

        self._executor.submit(work)

    def close(self) -> None:
        # Waits for the generation in progress (if any) so the model is never freed under it.
        self._executor.shutdown(wait=True)
        self.release()

    def release(self) -> None:
        """Drop the pipeline; called once no generation runs."""

"""The batching engine's side in the bot's process: requests, streams, and the threads that talk to the worker.

A sender thread renders each prompt and prepares its pixels (work that would stall the event loop) and
forwards cancellations; a reader thread decodes the worker's token ids into each stream's text. The child
process itself is :mod:`bot.engine.batching.worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bot.engine.base import BatchingOptions, EngineError, GenerationSettings, ImageRef, TextStream, Turn
from bot.engine.batching.detokenize import IncrementalText
from bot.engine.batching.launch import default_kv_cache_gb, signal_name, start_worker
from bot.engine.batching.protocol import (
    Add,
    Close,
    EmbedInputs,
    Failed,
    Images,
    Inputs,
    PromptInputs,
    Stop,
    ToWorker,
    Update,
    Updates,
    WorkerOptions,
    describe,
)
from bot.engine.genai import pre_crops, tagged_prompt
from bot.engine.lru import LruCache
from bot.engine.template import ChatTemplate
from bot.engine.threaded import TemplateEngine

log = logging.getLogger(__name__)

GONE = "The model process stopped unexpectedly; please ask again in a moment."
UNLOADED = "The model was unloaded before the answer finished."

# How often the sender looks for cancelled streams while requests run (seconds).
_CANCEL_POLL = 0.02


# --- this process --------------------------------------------------------------------------------------
@dataclass
class _Request:
    """One generation as the parent tracks it."""

    request_id: int
    stream: TextStream
    conversation: tuple[Turn, ...]
    settings: GenerationSettings
    text: IncrementalText
    submitted: bool = False
    stop_sent: bool = False


class BatchingEngine(TemplateEngine):
    """Continuous batching with prefix caching and an encoded-image cache, in a child process.

    ``options`` sizes the KV cache, the prefill chunks, the image cache and how many answers are decoded
    together (see :class:`BatchingOptions`).
    """

    name = "genai-batching"
    imports_on_load = ("openvino", "openvino_genai")
    takes_batching_options = True
    # Four channels answer together by default: more sequences per step add attention cost faster than they
    # save passes over the weights on a small CPU (measured: 4 streams give ~2.2x one stream's tokens/s).
    max_concurrency = BatchingOptions.concurrency

    def __init__(
        self,
        model_dir: str,
        device: str = "CPU",
        ov_config: dict[str, str] | None = None,
        *,
        options: BatchingOptions | None = None,
    ) -> None:
        super().__init__(model_dir, device, ov_config)
        options = options or BatchingOptions()
        problem = options.problem()
        if problem is not None:
            raise EngineError(f"Batching option {problem[0]} {problem[1]}.")
        self.max_concurrency = options.concurrency
        self._requests: dict[int, _Request] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # What the sender thread does next: submit a request, close, or (None) look for cancellations.
        self._outbox: queue.Queue[_Request | Close | None] = queue.Queue()
        self._closed = False
        self._broken: str | None = None
        # Images the vision encoder ran on, and images whose features came from the cache (LLaVA-1.5).
        self.images_encoded = 0
        self.images_reused = 0
        # Pixels of recent images by their SHA-256, so a follow-up skips resizing.
        self._pixels: LruCache[str, tuple[str, np.ndarray]] = LruCache(options.image_cache_size)
        # The child imports OpenVINO while this process loads the tokenizer; it waits for its options.
        self._process, self._conn = start_worker()
        try:
            self.template = ChatTemplate(model_dir)
            self._pre_crop = pre_crops(self.template)
            self._tokenizer = self.template.tokenizer
            # Building embeddings here needs LLaVA-1.5's simple layout: one fixed block of features per image.
            embeds_here = self.template.model_type == "llava"
            image_token = self.template.image_token_id if embeds_here else None
            self.options = self._worker_options(options, image_token)
            self._conn.send(self.options)
            self._await_ready()
        except BaseException:
            self._abandon_worker()
            raise
        self._sender = threading.Thread(target=self._send_loop, name="genai-batching-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="genai-batching-read", daemon=True)
        self._sender.start()
        self._reader.start()
        log.info(
            "Batching engine ready for %s (KV cache %d GB, chunks of %d tokens, %d answers at once, %s)",
            model_dir,
            self.options.kv_cache_gb,
            options.max_batched_tokens,
            options.concurrency,
            "image cache" if embeds_here else "genai image encoding",
        )

    def _worker_options(self, options: BatchingOptions, image_token: int | None) -> WorkerOptions:
        return WorkerOptions(
            model_dir=str(self.model_dir),
            device=self.device,
            ov_config=dict(self.ov_config),
            kv_cache_gb=options.kv_cache_gb or default_kv_cache_gb(self.model_dir),
            max_batched_tokens=options.max_batched_tokens,
            image_cache_size=options.image_cache_size,
            max_sequences=options.concurrency,
            image_token_id=image_token,
        )

    def _abandon_worker(self) -> None:
        """Let a worker that never became ready go, killing it if it does not exit."""
        self._conn.close()  # the child sees the end of its input and exits
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _await_ready(self) -> None:
        while not self._conn.poll(0.5):
            if self._process.poll() is not None:
                raise EngineError(f"Cannot load the model in {self.model_dir}: its process exited.")
        try:
            started = self._conn.started()
        except (EOFError, OSError):
            started = Failed("its process exited.")
        if isinstance(started, Failed):
            raise EngineError(f"Cannot load the model in {self.model_dir}: {started.detail}")

    # --- event loop side ------------------------------------------------------------------------------
    def generate(self, conversation: Sequence[Turn], settings: GenerationSettings) -> TextStream:
        stream = TextStream(asyncio.get_running_loop())
        stream.stats.started = time.monotonic()  # includes any wait for admission: that is what a person feels
        if self._closed or self._broken:
            stream.finish(EngineError(self._broken or "The model is being unloaded."))
            return stream
        request = _Request(next(self._ids), stream, tuple(conversation), settings, IncrementalText(self._tokenizer))
        with self._lock:
            self._requests[request.request_id] = request
        self._outbox.put(request)
        return stream

    # --- preparing inputs (sender thread) ---------------------------------------------------------------
    def inputs(self, conversation: Sequence[Turn]) -> Inputs:
        """What the child needs for this conversation (rendering and pixel work happen here, not there)."""
        if self.options.image_token_id is None:
            prompt, arrays = tagged_prompt(self.template, conversation, self._pre_crop)
            return PromptInputs(prompt, tuple(arrays))
        text, images = self.template.render(conversation)
        input_ids = self.template.token_ids(self.template.expand(text, images))
        return EmbedInputs(input_ids, tuple(self._image_pixels(ref) for ref in self.template.image_refs(conversation)))

    def _image_pixels(self, ref: ImageRef) -> tuple[str, np.ndarray]:
        """Pixel values ``[1, 3, H, W]`` of one image, named by the image's SHA-256; a follow-up's image skips
        the resize. The pixels follow from the image alone (the template is fixed), so the same name also
        keys the image's features in the worker's cache."""
        known = self._pixels.get(ref.sha256)
        if known is not None:
            return known
        pixels = np.ascontiguousarray(self.template.pixel_values(ref.image)[None], dtype=np.float32)
        return self._pixels.put(ref.sha256, (ref.sha256, pixels))

    def _send(self, message: ToWorker) -> bool:
        try:
            self._conn.send(message)
        except (OSError, ValueError):
            self._fail_all(GONE)
            return False
        return True

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                busy = bool(self._requests)
            try:
                item = self._outbox.get(timeout=_CANCEL_POLL if busy else None)
            except queue.Empty:
                item = None
            if isinstance(item, Close):
                self._send(item)
                return
            if isinstance(item, _Request):
                self._submit(item)
            self._forward_cancellations()

    def _submit(self, request: _Request) -> None:
        if request.stream.cancelled or self._broken:
            self._end(request, EngineError(self._broken) if self._broken else None)
            return
        try:
            inputs = self.inputs(request.conversation)
        except Exception as error:
            if not isinstance(error, EngineError):
                log.exception("Could not prepare a prompt for %s", self.model_dir)
            self._end(request, EngineError(describe(error)))
            return
        request.submitted = True
        self._send(Add(request.request_id, inputs, request.settings))

    def _forward_cancellations(self) -> None:
        with self._lock:
            cancelled = [r for r in self._requests.values() if r.submitted and r.stream.cancelled and not r.stop_sent]
            for request in cancelled:
                request.stop_sent = True
        for request in cancelled:
            self._send(Stop(request.request_id))

    # --- results (reader thread) ---------------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Updates):
                for update in message.updates:
                    self._apply(update)
            elif isinstance(message, Images):
                self.images_encoded += message.encoded
                self.images_reused += message.reused
        self._fail_all(UNLOADED if self._closed else GONE)

    def _apply(self, update: Update) -> None:
        new_ids, finished, error = update.new_ids, update.finished, update.error
        with self._lock:
            request = self._requests.get(update.request_id)
        if request is None:
            return
        stream = request.stream
        if new_ids:
            stream.touch()  # progress for the watchdog, even while the text holds back a partial word
        if new_ids and stream.stats.first_token is None:
            stream.stats.first_token = time.monotonic()
        piece = request.text.add(new_ids) if new_ids else ""
        if finished:
            piece += request.text.finish()
        if piece:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                stream.push(piece)
        if finished:
            stream.stats.prompt_tokens = update.prompt_tokens
            self._end(request, EngineError(error) if error else None)
        elif stream.cancelled and not request.stop_sent:
            # Checked on every step's tokens, so a cancelled answer stops within a token or two.
            self._outbox.put(None)

    def _end(self, request: _Request, error: EngineError | None) -> None:
        with self._lock:
            if self._requests.pop(request.request_id, None) is None:
                return  # already ended (a failure and the child's last word can race at shutdown)
        stats = request.stream.stats
        stats.new_tokens = len(request.text.ids)
        stats.finished = time.monotonic()
        request.stream.finish(error)

    def _fail_all(self, message: str) -> None:
        if not self._closed:
            self._broken = message
        with self._lock:
            requests = list(self._requests.values())
        for request in requests:
            self._end(request, EngineError(message))

    # --- health (read by the supervisor) -----------------------------------------------------------------
    @property
    def worker_pid(self) -> int:
        """Process id of the child process that runs the pipeline."""
        return self._process.pid

    def failure(self) -> str | None:
        if self._closed:
            return None
        code = self._process.poll()
        if code is not None:
            how = f"was ended by {signal_name(-code)}" if code < 0 else f"exited with status {code}"
            return f"the worker process {self._process.pid} {how}"
        return self._broken

    def kill(self) -> bool:
        """SIGKILL the child (it may be stopped or stuck in a step); the reader then ends every answer."""
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()
        return True

    # --- shutting down -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the child process; answers still running end where they are."""
        if self._closed:
            return
        self._closed = True
        self._outbox.put(Close())
        self._sender.join(30)
        self._reader.join(60)
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("The batching process of %s did not exit; killing it", self.model_dir)
            self._process.kill()
            self._process.wait(10)
        self._conn.close()
        self._fail_all(UNLOADED)

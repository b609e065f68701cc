"""The batching engine: openvino-genai's ``ContinuousBatchingPipeline`` serving many channels at once.

Why it looks the way it does:

* **Continuous batching.** Every request joins the running batch at the next step, so four channels share
  each pass over the weights (decoding is bound by memory bandwidth, so a step for four sequences costs little
  more than a step for one) and a new question never waits for another channel's whole answer. Long prompts
  are prefilled in chunks (``max_batched_tokens``) interleaved with the others' decoding.
* **Work reuse across turns.** Prefix caching keeps the KV blocks of finished requests; a follow-up whose
  prompt extends an earlier one (same image, same history) only computes its new tokens. This works across
  interleaved channels because blocks are found by content, not by "the last request". The pipeline would
  still re-run the vision encoder for every request that carries an image, which costs more than the new
  tokens of a follow-up, so for LLaVA-1.5 the engine builds the input embeddings itself and keeps the
  encoded images in a small LRU cache (keyed by the pixel values' digest). Other families (LLaVA-NeXT) go
  through genai's own image handling: their KV prefix is reused, their images are encoded again.
* **A separate process.** The pipeline's Python binding holds the GIL for the whole of ``step()`` and
  ``add_request()`` (a prefill chunk takes a second or more on large models), which would freeze the bot's
  event loop. The pipeline therefore runs in a child process that does nothing but step; this process
  renders prompts, prepares pixels, decodes tokens to text and feeds the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from bot.engine.base import Engine, EngineError, GenerationSettings, TextStream, Turn
from bot.engine.genai import generation_config, pre_crops, tagged_prompt
from bot.engine.template import ChatTemplate

log = logging.getLogger(__name__)

# Tokens of KV cache the automatic size aims for: about 40 image conversations of LLaVA-1.5 (~700 tokens
# each) stay reusable next to four answers in progress.
_KV_TOKENS_TARGET = 32768
# Never take more than this share of the machine's memory for the KV cache by default.
_KV_MEMORY_SHARE = 0.25
# How often the sender looks for cancelled streams while requests run (seconds).
_CANCEL_POLL = 0.02

BUSY = "The model is too busy to answer right now; please try again in a moment."
GONE = "The model process stopped unexpectedly; please ask again in a moment."


# --- what crosses the process boundary --------------------------------------------------------------
@dataclass(frozen=True)
class WorkerOptions:
    """Everything the child process needs to build the pipeline (plain data, picklable)."""

    model_dir: str
    device: str
    ov_config: dict[str, str]
    kv_cache_gb: int
    max_batched_tokens: int
    image_cache_size: int
    image_token_id: int | None  # set when this process builds the input embeddings (LLaVA-1.5)


@dataclass(frozen=True)
class EmbedInputs:
    """A LLaVA-1.5 prompt as the reference builds it: token ids with image tokens expanded, and the pixels
    of each image with the digest that names its features in the child's cache."""

    input_ids: np.ndarray  # int64 [1, T]
    images: tuple[tuple[str, np.ndarray], ...]  # (digest, float32 [1, 3, H, W])


@dataclass(frozen=True)
class PromptInputs:
    """A prompt with genai image tags, and its images as uint8 HWC arrays (genai encodes them)."""

    prompt: str
    images: tuple[np.ndarray, ...]


# One update of one request: (request id, new token ids, finished, error message or None, prompt tokens).
Update = tuple[int, list[int], bool, str | None, int]


def default_kv_cache_gb(model_dir: str | Path) -> int:
    """KV cache size (whole GB, as the scheduler takes it) for ``_KV_TOKENS_TARGET`` fp16 tokens, capped at a
    quarter of the machine's memory and at least 1 GB."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config", config)
    layers = int(text.get("num_hidden_layers", 32))
    heads = int(text.get("num_attention_heads", 32))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text.get("hidden_size", 4096)) // heads)
    per_token = layers * kv_heads * head_dim * 2 * 2  # K and V, 2 bytes each
    wanted = math.ceil(_KV_TOKENS_TARGET * per_token / 2**30)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cap = max(1, int(total * _KV_MEMORY_SHARE / 2**30))
    except (ValueError, OSError, AttributeError):
        cap = wanted
    return max(1, min(wanted, cap))


class IncrementalText:
    """Turns a growing list of token ids into text pieces that concatenate to exactly the final text.

    The text is decoded from all ids each time, so a character spread over several tokens comes out whole.
    Until :meth:`finish`, an incomplete character (decoded as U+FFFD) and trailing whitespace (which the next
    token may merge or clean up) are held back, so every piece only ever extends what was sent.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def add(self, ids: Sequence[int]) -> str:
        """Take new tokens; return the text they settle (possibly empty)."""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._advance(text.rstrip("\ufffd").rstrip())

    def finish(self) -> str:
        """The rest of the text, now that no token follows."""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent):
            return ""
        if not text.startswith(self.sent):
            # Not seen with LLaVA's tokenizers; the stream keeps what it has rather than contradict itself.
            log.warning("Decoded text changed before the end of the answer; some text may be missing")
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


# --- the child process ---------------------------------------------------------------------------------
class _Worker:
    """Owns the pipeline in the child process and steps it while any request is active."""

    def __init__(self, conn: Connection, options: WorkerOptions) -> None:
        import openvino as ov
        import openvino_genai

        self.conn = conn
        self.options = options
        self.ov = ov
        self.genai = openvino_genai
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = True
        scheduler.cache_size = options.kv_cache_gb
        scheduler.dynamic_split_fuse = True
        scheduler.max_num_batched_tokens = options.max_batched_tokens
        self.pipeline = openvino_genai.ContinuousBatchingPipeline(
            options.model_dir, scheduler, options.device, options.ov_config
        )
        self.vision_encoder: Any = None
        self.text_embeddings: Any = None
        if options.image_token_id is not None:
            # Separate compiled copies: the pipeline does not expose its own embedding models.
            core = ov.Core()
            folder = Path(options.model_dir)
            self.vision_encoder = core.compile_model(
                folder / "openvino_vision_embeddings_model.xml", options.device, options.ov_config
            ).create_infer_request()
            self.text_embeddings = core.compile_model(
                folder / "openvino_text_embeddings_model.xml", options.device, options.ov_config
            ).create_infer_request()
        self.features: OrderedDict[str, np.ndarray] = OrderedDict()
        self.pending: deque[tuple[int, EmbedInputs | PromptInputs, GenerationSettings]] = deque()
        # request id -> (handle, the embeddings it was given: kept alive while the pipeline may read them)
        self.active: dict[int, tuple[Any, object]] = {}
        self.prompt_tokens: dict[int, int] = {}
        self.closing = False
        self.encoded = self.reused = 0

    # Messages from the parent: ("add", id, inputs, settings), ("stop", id), ("close",).
    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "add":
            self.pending.append((message[1], message[2], message[3]))
        elif kind == "stop":
            request_id = message[1]
            if request_id in self.active:
                self.active[request_id][0].stop()
            else:
                self.pending = deque(job for job in self.pending if job[0] != request_id)
                self.conn.send(("updates", [(request_id, [], True, None, 0)]))
        elif kind == "close":
            self.closing = True

    def image_features(self, digest: str, pixels: np.ndarray) -> np.ndarray:
        """Projected features of one image ([tokens, hidden]), from the cache when the image was seen."""
        cached = self.features.get(digest)
        if cached is not None:
            self.features.move_to_end(digest)
            self.reused += 1
            return cached
        self.encoded += 1
        self.vision_encoder.infer({0: pixels})
        features = np.array(self.vision_encoder.get_output_tensor(0).data, dtype=np.float32, copy=True)
        features = features.reshape(-1, features.shape[-1])
        self.features[digest] = features
        while len(self.features) > self.options.image_cache_size:
            self.features.popitem(last=False)
        return features

    def embeddings(self, inputs: EmbedInputs) -> np.ndarray:
        """Text embeddings with each image's features written over its image tokens, as LLaVA does."""
        self.text_embeddings.infer({0: inputs.input_ids})
        embeds = np.array(self.text_embeddings.get_output_tensor(0).data, dtype=np.float32, copy=True)
        if inputs.images:
            features = np.concatenate([self.image_features(d, p) for d, p in inputs.images])
            slots = inputs.input_ids[0] == self.options.image_token_id
            if int(slots.sum()) != features.shape[0]:
                raise EngineError("The prompt's image tokens do not match the encoded images.")
            embeds[0, slots] = features
        return embeds

    def admit(self, request_id: int, inputs: EmbedInputs | PromptInputs, settings: GenerationSettings) -> None:
        config = generation_config(settings)
        try:
            if isinstance(inputs, EmbedInputs):
                self.encoded = self.reused = 0
                embeds = self.embeddings(inputs)
                self.conn.send(("images", (self.encoded, self.reused)))
                handle = self.pipeline.add_request(request_id, self.ov.Tensor(embeds), config)
                self.active[request_id] = (handle, embeds)
                self.prompt_tokens[request_id] = embeds.shape[1]
            else:
                images = [self.ov.Tensor(np.ascontiguousarray(image)) for image in inputs.images]
                handle = self.pipeline.add_request(request_id, inputs.prompt, images, config)
                self.active[request_id] = (handle, None)
        except Exception as error:
            log.exception("Could not start request %d", request_id)
            self.conn.send(("updates", [(request_id, [], True, _describe(error), 0)]))

    def needs_encoding(self, inputs: EmbedInputs | PromptInputs) -> bool:
        if isinstance(inputs, PromptInputs):
            return bool(inputs.images)  # genai encodes them inside add_request
        return any(digest not in self.features for digest, _ in inputs.images)

    def admit_pending(self) -> None:
        """Admit the waiting requests, but at most one that needs its images encoded, so the others'
        tokens keep flowing between encodings. (Waiting for more of a burst to share one step was tried: a
        step's prefill costs the sum of its prompts, so that only delays the first answers.)"""
        encoded = False
        while self.pending:
            costly = self.needs_encoding(self.pending[0][1])
            if costly and encoded:
                return
            self.admit(*self.pending.popleft())
            encoded = encoded or costly

    def collect(self) -> list[Update]:
        """New tokens of every active request; finished requests leave ``active``."""
        running = self.genai.GenerationStatus.RUNNING
        ignored = self.genai.GenerationStatus.IGNORED
        updates: list[Update] = []
        for request_id, (handle, _) in list(self.active.items()):
            status = handle.get_status()  # before reading, so no token can arrive unseen after it
            new: list[int] = []
            while handle.can_read():
                for output in handle.read().values():
                    new.extend(output.generated_ids)
            if status == running:
                if new:
                    updates.append((request_id, new, False, None, 0))
                continue
            del self.active[request_id]
            prompt_tokens = self.prompt_tokens.pop(request_id, 0)
            if not prompt_tokens:
                with contextlib.suppress(Exception):
                    prompt_tokens = int(handle.get_perf_metrics().get_num_input_tokens())
            error = BUSY if status == ignored else None
            updates.append((request_id, new, True, error, prompt_tokens))
        return updates

    def run(self) -> None:
        while not self.closing:
            if not self.active and not self.pending and not self.pipeline.has_non_finished_requests():
                self.handle(self.conn.recv())  # idle: sleep until the parent has something
            while self.conn.poll():
                self.handle(self.conn.recv())
            if self.closing:
                break
            self.admit_pending()
            if not self.pipeline.has_non_finished_requests():
                # Finished or stopped before a step; whatever still looks active is unknown to the pipeline
                # now and is ended rather than waited for.
                updates = self.collect()
                updates += [(rid, [], True, None, self.prompt_tokens.pop(rid, 0)) for rid in self.active]
                self.active.clear()
                if updates:
                    self.conn.send(("updates", updates))
                continue
            try:
                self.pipeline.step()
            except Exception as error:
                log.exception("A pipeline step failed")
                message = _describe(error)
                failed: list[Update] = [(request_id, [], True, message, 0) for request_id in self.active]
                for handle, _ in self.active.values():
                    with contextlib.suppress(Exception):
                        handle.cancel()
                self.active.clear()
                self.conn.send(("updates", failed))
                continue
            updates = self.collect()
            if updates:
                self.conn.send(("updates", updates))
        self.shutdown()

    def shutdown(self) -> None:
        """Stop what still runs; the parent has asked to close and treats these answers as ended."""
        ended: list[Update] = [(request_id, [], True, None, 0) for request_id in self.active]
        ended += [(job[0], [], True, None, 0) for job in self.pending]
        for handle, _ in self.active.values():
            with contextlib.suppress(Exception):
                handle.stop()
        if ended:
            with contextlib.suppress(OSError):
                self.conn.send(("updates", ended))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _describe(error: BaseException) -> str:
    if isinstance(error, EngineError):
        return str(error)
    return f"The model failed while answering ({error.__class__.__name__})."


def serve(conn: Connection) -> None:
    """Body of the child process: read the options, build the pipeline, answer until told to close."""
    try:
        options = conn.recv()
    except (EOFError, OSError):
        return  # the parent gave up before sending them
    try:
        worker = _Worker(conn, options)
    except Exception as error:
        with contextlib.suppress(OSError):
            conn.send(("failed", f"{error.__class__.__name__}: {error}"))
        return
    conn.send(("ready", None))
    try:
        worker.run()
    except (EOFError, OSError):
        pass  # the parent went away; nothing is left to answer to
    finally:
        worker.pipeline = None


def main() -> None:
    """The child's entry point: ``python -c "from bot.engine.batching import main; main()" FD``."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s [batching]: %(message)s")
    # The bot decides when this process ends (it closes the connection, or dies). A deploy may signal every
    # process of the group at once (Ctrl+C does), and the answers given a grace period still need the model.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(Connection(int(sys.argv[1])))


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


def _image_key(image: Any) -> str:
    """Names an image by its pixels (the bot decodes stored images afresh for every request)."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    return digest.hexdigest()


def _start_child() -> tuple[subprocess.Popen[bytes], Connection]:
    """Start the child process, connected to this one by a socket pair.

    A plain interpreter rather than multiprocessing's "spawn", which re-imports the parent's ``__main__`` and so
    runs any script without a ``__name__`` guard a second time; forking a process that already runs OpenVINO
    threads is not safe either.
    """
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    # The child must find this package even when the parent found it through its own sys.path.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with theirs:
        process = subprocess.Popen(
            [sys.executable, "-c", "from bot.engine.batching import main; main()", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    return process, Connection(ours.detach())


class BatchingEngine(Engine):
    """Continuous batching with prefix caching and an encoded-image cache, in a child process.

    ``kv_cache_gb`` sizes the KV cache (default: enough for ~32k tokens, at most a quarter of the memory);
    ``max_batched_tokens`` is the most tokens one step computes (prefill chunk size: smaller keeps the other
    channels' tokens flowing during a new image's prefill, larger prefills faster); ``image_cache_size`` is how
    many encoded images are kept for follow-ups (LLaVA-1.5).
    """

    name = "genai-batching"
    # Four channels answer together: more sequences per step add attention cost faster than they save
    # passes over the weights on a small CPU (measured: 4 streams give ~2.2x one stream's tokens/s).
    max_concurrency = 4

    def __init__(
        self,
        model_dir: str,
        device: str = "CPU",
        ov_config: dict[str, str] | None = None,
        *,
        kv_cache_gb: int | None = None,
        max_batched_tokens: int = 256,
        image_cache_size: int = 16,
    ) -> None:
        super().__init__(model_dir, device, ov_config)
        self._requests: dict[int, _Request] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._outbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._closed = False
        self._broken: str | None = None
        # Images the vision encoder ran on, and images whose features came from the cache (LLaVA-1.5).
        self.images_encoded = 0
        self.images_reused = 0
        # Pixels of recent images by the digest of their RGB bytes, so a follow-up skips resizing.
        self._pixels: OrderedDict[str, tuple[str, np.ndarray]] = OrderedDict()
        # The child imports OpenVINO while this process loads the tokenizer; it waits for its options.
        self._process, self._conn = _start_child()
        try:
            self.template = ChatTemplate(model_dir)
            self._pre_crop = pre_crops(self.template)
            self._tokenizer = self.template.tokenizer
            # Building embeddings here needs LLaVA-1.5's simple layout: one fixed block of features per image.
            embeds_here = self.template.model_type == "llava"
            image_token = self.template.image_token_id if embeds_here else None
            self.options = WorkerOptions(
                model_dir=str(model_dir),
                device=device,
                ov_config=dict(self.ov_config),
                kv_cache_gb=kv_cache_gb if kv_cache_gb is not None else default_kv_cache_gb(model_dir),
                max_batched_tokens=max_batched_tokens,
                image_cache_size=image_cache_size,
                image_token_id=image_token,
            )
            self._conn.send(self.options)
            self._await_ready()
        except BaseException:
            self._conn.close()  # the child sees the end of its input and exits
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            raise
        self._sender = threading.Thread(target=self._send_loop, name="genai-batching-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="genai-batching-read", daemon=True)
        self._sender.start()
        self._reader.start()
        log.info(
            "Batching engine ready for %s (KV cache %d GB, chunks of %d tokens, %s)",
            model_dir,
            self.options.kv_cache_gb,
            max_batched_tokens,
            "image cache" if embeds_here else "genai image encoding",
        )

    def _await_ready(self) -> None:
        while not self._conn.poll(0.5):
            if self._process.poll() is not None:
                raise EngineError(f"Cannot load the model in {self.model_dir}: its process exited.")
        try:
            kind, detail = self._conn.recv()
        except (EOFError, OSError):
            kind, detail = "failed", "its process exited."
        if kind != "ready":
            raise EngineError(f"Cannot load the model in {self.model_dir}: {detail}")

    @property
    def context_window(self) -> int:
        return self.template.context_window

    def count_prompt_tokens(self, conversation: Sequence[Turn]) -> int:
        return self.template.count_tokens(conversation)

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
        self._outbox.put(("add", request))
        return stream

    # --- preparing inputs (sender thread) ---------------------------------------------------------------
    def inputs(self, conversation: Sequence[Turn]) -> EmbedInputs | PromptInputs:
        """What the child needs for this conversation (rendering and pixel work happen here, not there)."""
        if self.options.image_token_id is None:
            prompt, arrays = tagged_prompt(self.template, conversation, self._pre_crop)
            return PromptInputs(prompt, tuple(arrays))
        text, images = self.template.render(conversation)
        input_ids = self.template.token_ids(self.template.expand(text, images))
        return EmbedInputs(input_ids, tuple(self._image_pixels(image) for image in images))

    def _image_pixels(self, image: Any) -> tuple[str, np.ndarray]:
        """Pixel values ``[1, 3, H, W]`` of one image and their digest; a follow-up's image skips the resize."""
        key = _image_key(image)
        known = self._pixels.get(key)
        if known is not None:
            self._pixels.move_to_end(key)
            return known
        pixels = np.ascontiguousarray(self.template.pixel_values(image)[None], dtype=np.float32)
        self._pixels[key] = (hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest(), pixels)
        while len(self._pixels) > self.options.image_cache_size:
            self._pixels.popitem(last=False)
        return self._pixels[key]

    def _send(self, message: tuple[Any, ...]) -> bool:
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
            if item is not None and item[0] == "close":
                self._send(("close",))
                return
            if item is not None and item[0] == "add":
                self._submit(item[1])
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
            self._end(request, EngineError(_describe(error)))
            return
        request.submitted = True
        self._send(("add", request.request_id, inputs, request.settings))

    def _forward_cancellations(self) -> None:
        with self._lock:
            cancelled = [r for r in self._requests.values() if r.submitted and r.stream.cancelled and not r.stop_sent]
            for request in cancelled:
                request.stop_sent = True
        for request in cancelled:
            self._send(("stop", request.request_id))

    # --- results (reader thread) ---------------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            if kind == "updates":
                for update in payload:
                    self._apply(*update)
            elif kind == "images":
                encoded, reused = payload
                self.images_encoded += encoded
                self.images_reused += reused
        self._fail_all("The model was unloaded before the answer finished." if self._closed else GONE)

    def _apply(self, request_id: int, new_ids: list[int], finished: bool, error: str | None, prompt: int) -> None:
        with self._lock:
            request = self._requests.get(request_id)
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
            stream.stats.prompt_tokens = prompt
            self._end(request, EngineError(error) if error else None)
        elif stream.cancelled and not request.stop_sent:
            # Checked on every step's tokens, so a cancelled answer stops within a token or two.
            self._outbox.put(("cancelled",))

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
            how = f"was ended by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
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
        self._outbox.put(("close",))
        self._sender.join(30)
        self._reader.join(60)
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("The batching process of %s did not exit; killing it", self.model_dir)
            self._process.kill()
            self._process.wait(10)
        self._conn.close()
        self._fail_all("The model was unloaded before the answer finished.")

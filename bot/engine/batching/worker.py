"""The batching worker: the child process that owns openvino-genai's ``ContinuousBatchingPipeline``.

It does nothing but admit requests and step the pipeline, so the GIL the pipeline holds during a step never
stalls the bot's event loop. It reads :mod:`~bot.engine.batching.protocol` messages and answers with token ids;
the bot's process renders prompts, prepares pixels and decodes text.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from bot.engine.base import EngineError
from bot.engine.batching.protocol import (
    Add,
    Close,
    EmbedInputs,
    Failed,
    Images,
    Inputs,
    PromptInputs,
    Ready,
    Stop,
    ToWorker,
    Update,
    Updates,
    WorkerEnd,
    WorkerOptions,
    describe,
    ended,
)
from bot.engine.genai import generation_config
from bot.engine.lru import LruCache

log = logging.getLogger(__name__)

BUSY = "The model is too busy to answer right now; please try again in a moment."


class Worker:
    """Owns the pipeline in the child process and steps it while any request is active."""

    def __init__(self, conn: WorkerEnd, options: WorkerOptions) -> None:
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
        scheduler.max_num_seqs = options.max_sequences  # for the pipeline's own bookkeeping; see admit_pending
        self.pipeline: Any = openvino_genai.ContinuousBatchingPipeline(
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
        # Projected features of recent images by their digest: a follow-up skips the vision encoder.
        self.features: LruCache[str, np.ndarray] = LruCache(options.image_cache_size)
        self.pending: deque[Add] = deque()
        # request id -> (handle, the embeddings it was given: kept alive while the pipeline may read them)
        self.active: dict[int, tuple[Any, object]] = {}
        self.prompt_tokens: dict[int, int] = {}
        self.closing = False
        self.encoded = self.reused = 0

    def handle(self, message: ToWorker) -> None:
        """Act on one message from the parent."""
        if isinstance(message, Add):
            self.pending.append(message)
        elif isinstance(message, Stop):
            request_id = message.request_id
            if request_id in self.active:
                self.active[request_id][0].stop()
            else:
                self.pending = deque(job for job in self.pending if job.request_id != request_id)
                self.conn.send(Updates((ended(request_id),)))
        elif isinstance(message, Close):
            self.closing = True

    def image_features(self, digest: str, pixels: np.ndarray) -> np.ndarray:
        """Projected features of one image ([tokens, hidden]), from the cache when the image was seen."""
        cached = self.features.get(digest)
        if cached is not None:
            self.reused += 1
            return cached
        self.encoded += 1
        self.vision_encoder.infer({0: pixels})
        features = np.array(self.vision_encoder.get_output_tensor(0).data, dtype=np.float32, copy=True)
        return self.features.put(digest, features.reshape(-1, features.shape[-1]))

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

    def admit(self, job: Add) -> None:
        """Hand one request to the pipeline; a request that cannot start ends with its error."""
        request_id, inputs = job.request_id, job.inputs
        config = generation_config(job.settings)
        try:
            if isinstance(inputs, EmbedInputs):
                self.encoded = self.reused = 0
                embeds = self.embeddings(inputs)
                self.conn.send(Images(self.encoded, self.reused))
                handle = self.pipeline.add_request(request_id, self.ov.Tensor(embeds), config)
                self.active[request_id] = (handle, embeds)
                self.prompt_tokens[request_id] = embeds.shape[1]
            else:
                images = [self.ov.Tensor(np.ascontiguousarray(image)) for image in inputs.images]
                handle = self.pipeline.add_request(request_id, inputs.prompt, images, config)
                self.active[request_id] = (handle, None)
        except Exception as error:
            log.exception("Could not start request %d", request_id)
            self.conn.send(Updates((ended(request_id, describe(error)),)))

    def needs_encoding(self, inputs: Inputs) -> bool:
        """Whether admitting these inputs runs the vision encoder (the costly part of a new image)."""
        if isinstance(inputs, PromptInputs):
            return bool(inputs.images)  # genai encodes them inside add_request
        return any(digest not in self.features for digest, _ in inputs.images)

    def admit_pending(self) -> None:
        """Admit the waiting requests up to ``max_sequences`` running, but at most one that needs its images
        encoded, so the others' tokens keep flowing between encodings. (Waiting for more of a burst to share
        one step was tried: a step's prefill costs the sum of its prompts, so that only delays the first
        answers.) The limit is kept here because the pipeline's scheduler applies ``max_num_seqs`` only
        without dynamic split-fuse."""
        encoded = False
        while self.pending and len(self.active) < self.options.max_sequences:
            costly = self.needs_encoding(self.pending[0].inputs)
            if costly and encoded:
                return
            self.admit(self.pending.popleft())
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
                    updates.append(Update(request_id, tuple(new)))
                continue
            del self.active[request_id]
            prompt_tokens = self.prompt_tokens.pop(request_id, 0)
            if not prompt_tokens:
                with contextlib.suppress(Exception):
                    prompt_tokens = int(handle.get_perf_metrics().get_num_input_tokens())
            error = BUSY if status == ignored else None
            updates.append(Update(request_id, tuple(new), True, error, prompt_tokens))
        return updates

    def run(self) -> None:
        """Admit and step until the parent asks to close."""
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
                updates += [
                    Update(rid, finished=True, prompt_tokens=self.prompt_tokens.pop(rid, 0)) for rid in self.active
                ]
                self.active.clear()
                if updates:
                    self.conn.send(Updates(tuple(updates)))
                continue
            self.step()
        self.shutdown()

    def step(self) -> None:
        """One pipeline step, then the tokens it produced; a failed step ends every active request."""
        try:
            self.pipeline.step()
        except Exception as error:
            log.exception("A pipeline step failed")
            message = describe(error)
            failed = tuple(ended(request_id, message) for request_id in self.active)
            for handle, _ in self.active.values():
                with contextlib.suppress(Exception):
                    handle.cancel()
            self.active.clear()
            self.conn.send(Updates(failed))
            return
        updates = self.collect()
        if updates:
            self.conn.send(Updates(tuple(updates)))

    def shutdown(self) -> None:
        """Stop what still runs; the parent has asked to close and treats these answers as ended."""
        finished = [ended(request_id) for request_id in self.active]
        finished += [ended(job.request_id) for job in self.pending]
        for handle, _ in self.active.values():
            with contextlib.suppress(Exception):
                handle.stop()
        if finished:
            with contextlib.suppress(OSError):
                self.conn.send(Updates(tuple(finished)))


def serve(conn: WorkerEnd) -> None:
    """Body of the child process: read the options, build the pipeline, answer until told to close."""
    try:
        options = conn.options()
    except (EOFError, OSError):
        return  # the parent gave up before sending them
    try:
        worker = Worker(conn, options)
    except Exception as error:
        with contextlib.suppress(OSError):
            conn.send(Failed(f"{error.__class__.__name__}: {error}"))
        return
    conn.send(Ready())
    try:
        worker.run()
    except (EOFError, OSError):
        pass  # the parent went away; nothing is left to answer to
    finally:
        worker.pipeline = None


def main() -> None:
    """The child's entry point: ``python -c "from bot.engine.batching.worker import main; main()" FD``."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s [batching]: %(message)s")
    # The bot decides when this process ends (it closes the connection, or dies). A deploy may signal every
    # process of the group at once (Ctrl+C does), and the answers given a grace period still need the model.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(WorkerEnd(Connection(int(sys.argv[1]))))

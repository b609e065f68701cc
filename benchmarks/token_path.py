"""Where a decode step of the batching engine goes: inference, the pipeline's own work, and ours.

``python -m benchmarks.token_path --folder DIR/INT4 [--ov-config KEY=VALUE ...] [--tokens 128]`` runs the
engine's real worker (:class:`bot.engine.batching.worker.Worker`) in this process on one request, timing per
step: ``pipeline.step()`` (scheduler, inference, sampler), reading the handle (``collect``) and pickling the
message the parent receives; then the parent's side for the same tokens: unpickling and turning ids into
text (:class:`IncrementalText`). For scale it also times the language model alone (the exported stateful
model, one token per infer request, the same weights), which is the inference a step cannot do without.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.properties import Load
from benchmarks.workload import FIRST_QUESTION, make_image
from bot.engine.base import BatchingOptions, GenerationSettings, ImageRef, Turn
from bot.engine.batching.detokenize import IncrementalText
from bot.engine.batching.launch import default_kv_cache_gb
from bot.engine.batching.protocol import Add, EmbedInputs, Updates, WorkerOptions
from bot.engine.batching.worker import Worker
from bot.engine.ov_config import BadPair, parse_pairs
from bot.engine.template import ChatTemplate


class _Pipe:
    """Stands in for the worker's connection: keeps each message pickled, as the socket would carry it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.pickle_s = 0.0

    def send(self, message: object) -> None:
        started = time.perf_counter()
        self.sent.append(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        self.pickle_s += time.perf_counter() - started


def _ms(values: Sequence[float]) -> dict[str, float]:
    return {"median_ms": 1000 * statistics.median(values), "mean_ms": 1000 * statistics.mean(values)}


def worker_steps(folder: Path, ov_config: dict[str, str], tokens: int) -> tuple[dict[str, Any], list[bytes]]:
    """Per decode step: step(), collect() and pickling, on the engine's own worker code."""
    template = ChatTemplate(folder)
    options = BatchingOptions()
    worker_options = WorkerOptions(
        str(folder), "CPU", ov_config, default_kv_cache_gb(folder), options.max_batched_tokens,
        options.image_cache_size, options.concurrency, template.image_token_id,
    )  # fmt: skip
    pipe = _Pipe()
    worker = Worker(pipe, worker_options)  # type: ignore[arg-type]
    image = make_image(1)
    conversation = [Turn("user", FIRST_QUESTION, (ImageRef.from_image(image),))]
    text, images = template.render(conversation)
    ids = template.token_ids(template.expand(text, images))
    pixels = np.ascontiguousarray(template.pixel_values(image)[None], dtype=np.float32)
    settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True)
    worker.admit(Add(1, EmbedInputs(ids, (("image", pixels),)), settings))
    pipe.sent.clear()  # the image count, which the parent reads once per request
    step_s, collect_s, pickle_s = [], [], []
    produced = 0
    while worker.pipeline.has_non_finished_requests():
        started = time.perf_counter()
        worker.pipeline.step()
        stepped = time.perf_counter()
        updates = worker.collect()
        collected = time.perf_counter()
        before = pipe.pickle_s
        if updates:
            pipe.send(Updates(tuple(updates)))
        new = sum(len(u.new_ids) for u in updates)
        if produced > 0 and new:  # decode steps only: the prefill chunks came before the first token
            step_s.append(stepped - started)
            collect_s.append(collected - stepped)
            pickle_s.append(pipe.pickle_s - before)
        produced += new
    worker.pipeline = None
    return {"steps": len(step_s), "step": _ms(step_s), "collect": _ms(collect_s), "pickle": _ms(pickle_s)}, pipe.sent


def parent_side(folder: Path, messages: list[bytes]) -> dict[str, Any]:
    """Per decode step in the bot's process: unpickling the message and turning its ids into text."""
    text = IncrementalText(ChatTemplate(folder).tokenizer)
    unpickle_s, decode_s = [], []
    for raw in messages:
        started = time.perf_counter()
        message = pickle.loads(raw)
        unpickled = time.perf_counter()
        if not isinstance(message, Updates):
            continue
        for update in message.updates:
            text.add(update.new_ids)
        decode_s.append(time.perf_counter() - unpickled)
        unpickle_s.append(unpickled - started)
    tail = decode_s[-max(1, len(decode_s) // 4) :]
    return {
        "unpickle": _ms(unpickle_s),
        "decode": _ms(decode_s),
        "decode_last_quarter": _ms(tail),
        "bytes": len(messages[-1]),
    }


def bare_language_model(folder: Path, ov_config: dict[str, str], tokens: int) -> dict[str, Any]:
    """One-token infer requests of the exported stateful language model (its KV cache inside)."""
    import openvino as ov

    core = ov.Core()
    model = core.compile_model(folder / "openvino_language_model.xml", "CPU", ov_config)
    request = model.create_infer_request()
    hidden = int(model.input("inputs_embeds").get_partial_shape()[2].get_length())
    names = {port.get_any_name() for port in model.inputs}
    times = []
    for position in range(tokens + 8):
        inputs: dict[str, Any] = {
            "inputs_embeds": np.random.default_rng(position).standard_normal((1, 1, hidden), dtype=np.float32),
            "attention_mask": np.ones((1, position + 1), dtype=np.int64),
            "position_ids": np.array([[position]], dtype=np.int64),
        }
        if "beam_idx" in names:
            inputs["beam_idx"] = np.zeros(1, dtype=np.int32)
        started = time.perf_counter()
        request.infer(inputs)
        if position >= 8:
            times.append(time.perf_counter() - started)
    return {"infer": _ms(times)}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the timings as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.token_path", description=__doc__)
    parser.add_argument("--folder", required=True, help="one precision folder")
    parser.add_argument("--ov-config", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    try:
        ov_config = parse_pairs(args.ov_config)
    except BadPair as error:
        parser.error(str(error))
    with Load() as during_steps:
        steps, messages = worker_steps(folder, ov_config, args.tokens)
    with Load() as during_bare:
        bare = bare_language_model(folder, ov_config, args.tokens)
    result = {
        "folder": str(folder),
        "ov_config": ov_config,
        "worker": steps,
        "parent": parent_side(folder, messages),
        "bare": bare,
        # Other processes' share of the CPU while the worker and the bare model ran.
        "other_load": {"worker": during_steps.share, "bare": during_bare.share},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

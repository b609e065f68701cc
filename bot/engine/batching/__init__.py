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
  encoded images in a small LRU cache (keyed by the image file's SHA-256). Other families (LLaVA-NeXT) go
  through genai's own image handling: their KV prefix is reused, their images are encoded again.
* **A separate process.** The pipeline's Python binding holds the GIL for the whole of ``step()`` and
  ``add_request()`` (a prefill chunk takes a second or more on large models), which would freeze the bot's
  event loop. The pipeline therefore runs in a child process that does nothing but step; this process
  renders prompts, prepares pixels, decodes tokens to text and feeds the streams.

The modules, one job each: ``protocol`` (every message between the processes), ``worker`` (the child),
``engine`` (this process's side), ``detokenize`` (token ids to streamed text).
"""

from bot.engine.batching.detokenize import IncrementalText
from bot.engine.batching.engine import GONE, BatchingEngine
from bot.engine.batching.launch import default_kv_cache_gb
from bot.engine.batching.protocol import EmbedInputs, PromptInputs, WorkerOptions
from bot.engine.batching.worker import BUSY

__all__ = [
    "BUSY",
    "GONE",
    "BatchingEngine",
    "EmbedInputs",
    "IncrementalText",
    "PromptInputs",
    "WorkerOptions",
    "default_kv_cache_gb",
]

"""The reference engine: Optimum Intel's ``OVModelForVisualCausalLM`` with transformers' generate."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from bot.engine.base import EngineError, GenerationSettings, TextStream, Turn
from bot.engine.extras import convert_extra_missing
from bot.engine.template import ChatTemplate
from bot.engine.threaded import ThreadedEngine

log = logging.getLogger(__name__)

_grid_patch_lock = threading.Lock()


def _fix_llava_next_grid_order(model: Any) -> None:
    """Make Optimum Intel's LLaVA-NeXT tile packing read the tile grid in the right order.

    Optimum Intel 2.2 unpacks transformers' ``get_anyres_image_grid_shape`` as (width, height) while
    transformers 5 returns (height, width): images whose tiles don't form a square grid then fail or
    come out scrambled. During packing we hand it the grid shape reversed, which is what it expects.
    """
    import transformers.models.llava_next.modeling_llava_next as llava_next

    original = model.pack_image_features
    grid_shape = llava_next.get_anyres_image_grid_shape

    def reversed_grid_shape(*args: Any, **kwargs: Any) -> tuple[int, int]:
        rows, columns = grid_shape(*args, **kwargs)
        return columns, rows

    def pack_image_features(*args: Any, **kwargs: Any) -> Any:
        # The packing code imports the function from the module at call time, so swap it there briefly.
        with _grid_patch_lock:
            llava_next.get_anyres_image_grid_shape = reversed_grid_shape
            try:
                return original(*args, **kwargs)
            finally:
                llava_next.get_anyres_image_grid_shape = grid_shape

    model.pack_image_features = pack_image_features


class OptimumEngine(ThreadedEngine):
    """Optimum Intel's pipeline: one stateful infer request, so one generation at a time."""

    name = "optimum"
    imports_on_load = ("openvino", "transformers", "optimum.intel")

    def __init__(self, model_dir: str, device: str = "CPU", ov_config: dict[str, str] | None = None) -> None:
        super().__init__(model_dir, device, ov_config, thread_name="optimum")
        problem = convert_extra_missing("The optimum engine")
        if problem:
            raise EngineError(problem)
        from optimum.intel import OVModelForVisualCausalLM
        from transformers import AutoProcessor

        self.template = ChatTemplate(model_dir)
        # The reference pipeline takes its inputs from transformers' own processor, as the reference does.
        self.processor: Any = AutoProcessor.from_pretrained(model_dir)
        self.model: Any = OVModelForVisualCausalLM.from_pretrained(
            model_dir, device=device, ov_config=self.ov_config or None
        )
        if self.template.model_type == "llava_next":
            _fix_llava_next_grid_order(self.model)

    def generate(self, conversation: Sequence[Turn], settings: GenerationSettings) -> TextStream:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

        stream = TextStream(asyncio.get_running_loop())

        class _Streamer(TextStreamer):
            # TextStreamer holds back partial words until they decode cleanly; we forward what it releases.
            def put(self, value: Any) -> None:
                if not self.next_tokens_are_prompt:
                    if stream.stats.first_token is None:
                        stream.stats.first_token = time.monotonic()
                    stream.stats.new_tokens += int(value.numel())
                    stream.touch()  # words are released whole: a token without text is progress too
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                stream.push(text)

        class _StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                return torch.full((input_ids.shape[0],), stream.cancelled, dtype=torch.bool)

        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": not settings.greedy,
            "streamer": _Streamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True),
            "stopping_criteria": StoppingCriteriaList([_StopWhenCancelled()]),
        }
        if not settings.greedy:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        if settings.ignore_eos:
            kwargs["min_new_tokens"] = settings.max_new_tokens

        def generate() -> None:
            # Image preprocessing runs here, off the event loop.
            text, images = self.template.render(conversation)
            inputs = self.processor(images=images or None, text=text, return_tensors="pt")
            stream.stats.prompt_tokens = int(inputs["input_ids"].shape[-1])
            self.model.generate(**inputs, **kwargs)

        self.run_alone(stream, generate)
        return stream

    def release(self) -> None:
        self.model = None

"""The openvino-genai engine: ``VLMPipeline`` running on its own worker thread."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import numpy as np

from bot.engine import preprocess
from bot.engine.base import EngineError, GenerationSettings, TextStream, Turn
from bot.engine.template import ChatTemplate
from bot.engine.threaded import ThreadedEngine

log = logging.getLogger(__name__)


def image_tensor(image: object) -> object:
    """A PIL image (or uint8 HWC array) as the uint8 HWC tensor openvino-genai expects."""
    import openvino as ov

    return ov.Tensor(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)))


def pre_crops(template: ChatTemplate) -> bool:
    """Whether images should be resized and cropped here, as the model's processor does, before genai sees them.

    LLaVA-1.5 sees one fixed square crop. Doing that step exactly as the transformers processor does makes genai's
    (differently rounded) resize a no-op, so genai and the transformers reference see exactly the same pixels.
    """
    return template.model_type == "llava" and template.settings.do_center_crop


def tagged_prompt(template: ChatTemplate, conversation: Sequence[Turn], pre_crop: bool) -> tuple[str, list[np.ndarray]]:
    """The rendered prompt with genai's image tags where the template put image tokens, and the images
    as uint8 HWC arrays in prompt order (arrays, not tensors, so they can also cross a process boundary)."""
    text, images = template.render(conversation)
    parts = text.split(template.image_token)
    if len(parts) - 1 != len(images):
        raise EngineError("The chat template placed a different number of images than were given.")
    # genai writes a newline after every image's tokens itself; the template's own would be a second one.
    tails = [part.removeprefix("\n") for part in parts[1:]]
    tagged = parts[0] + "".join(f"<ov_genai_image_{i}>{tail}" for i, tail in enumerate(tails))
    if pre_crop:
        return tagged, [preprocess.clip_crop(image, template.settings) for image in images]
    return tagged, [preprocess.as_array(image) for image in images]


def generation_config(settings: GenerationSettings) -> object:
    """openvino-genai's GenerationConfig for our settings (the prompt is always rendered already)."""
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = settings.max_new_tokens
    config.ignore_eos = settings.ignore_eos
    config.apply_chat_template = False  # the prompt is already rendered with the model's template
    if settings.greedy:
        config.do_sample = False
    else:
        config.do_sample = True
        config.temperature = settings.temperature
        config.top_p = settings.top_p
    return config


class GenaiEngine(ThreadedEngine):
    """openvino-genai's VLMPipeline; one generation at a time, on a dedicated thread."""

    name = "genai"
    imports_on_load = ("openvino", "openvino_genai")

    def __init__(self, model_dir: str, device: str = "CPU", ov_config: dict[str, str] | None = None) -> None:
        super().__init__(model_dir, device, ov_config, thread_name="genai")
        import openvino_genai

        self._genai = openvino_genai
        self.template = ChatTemplate(model_dir)
        self.pipeline = openvino_genai.VLMPipeline(model_dir, device, **self.ov_config)
        self._pre_crop = pre_crops(self.template)

    def _config(self, settings: GenerationSettings) -> object:
        return generation_config(settings)

    def prompt(self, conversation: Sequence[Turn]) -> tuple[str, list[object]]:
        """The rendered prompt with genai's image tags where the template put image tokens."""
        tagged, images = tagged_prompt(self.template, conversation, self._pre_crop)
        return tagged, [image_tensor(image) for image in images]

    def generate(self, conversation: Sequence[Turn], settings: GenerationSettings) -> TextStream:
        stream = TextStream(asyncio.get_running_loop())
        config = self._config(settings)
        status = self._genai.StreamingStatus

        def on_text(piece: str) -> object:
            if stream.stats.first_token is None:
                stream.stats.first_token = time.monotonic()
            stream.push(piece)
            return status.STOP if stream.cancelled else status.RUNNING

        def generate() -> None:
            # Rendering and image conversion happen here too: they would otherwise stall the loop.
            prompt, images = self.prompt(conversation)
            result = self.pipeline.generate(prompt, images=images, generation_config=config, streamer=on_text)
            metrics = result.perf_metrics
            stream.stats.prompt_tokens = int(metrics.get_num_input_tokens())
            stream.stats.new_tokens = int(metrics.get_num_generated_tokens())

        self.run_alone(stream, generate)
        return stream

    def release(self) -> None:
        self.pipeline = None

"""Render a conversation with the model's own chat template (the processor's ``apply_chat_template``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from bot.engine.base import Turn

log = logging.getLogger(__name__)


class ChatTemplate:
    """The processor of one converted model folder, used to turn turns into a prompt."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoConfig, AutoProcessor

        self.processor: Any = AutoProcessor.from_pretrained(str(model_dir))
        self.tokenizer: Any = self.processor.tokenizer
        self.image_token: str = getattr(self.processor, "image_token", "<image>")
        config = AutoConfig.from_pretrained(str(model_dir))
        self.model_type: str = str(config.model_type)
        text_config = getattr(config, "text_config", config)
        self.context_window: int = int(getattr(text_config, "max_position_embeddings", 4096))

    @staticmethod
    def messages(conversation: Sequence[Turn]) -> list[dict[str, Any]]:
        """The conversation as chat-template messages; a turn's images come before its text."""
        messages = []
        for turn in conversation:
            content: list[dict[str, Any]] = [{"type": "image"} for _ in turn.images]
            content.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": content})
        return messages

    def render(self, conversation: Sequence[Turn]) -> tuple[str, list[Image.Image]]:
        """Prompt text (with one image token per image) and the images in prompt order."""
        text = self.processor.apply_chat_template(
            self.messages(conversation), add_generation_prompt=True, tokenize=False
        )
        images = [image for turn in conversation for image in turn.images]
        return str(text), images

    def inputs(self, conversation: Sequence[Turn]) -> Any:
        """Model inputs (token ids, pixel values) exactly as the transformers reference builds them."""
        text, images = self.render(conversation)
        return self.processor(images=images or None, text=text, return_tensors="pt")

    def count_tokens(self, conversation: Sequence[Turn]) -> int:
        """Prompt length in tokens, each image counted as the tokens it expands to."""
        return int(self.inputs(conversation)["input_ids"].shape[-1])

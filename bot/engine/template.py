"""Render a conversation with the model's own chat template and count its tokens, without PyTorch.

The template is rendered with jinja2 set up as transformers sets it up, token ids come from the OpenVINO
tokenizer converted beside the model, and images are counted as the tokens they expand to
(:mod:`bot.engine.preprocess`). Serving thus needs neither ``torch`` nor ``transformers``, whose imports alone
cost seconds at every start.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bot.engine import preprocess
from bot.engine.base import EngineError, ImageRef, Turn

log = logging.getLogger(__name__)

# Families whose image layout (tokens per image, pixels) this module knows.
SUPPORTED = ("llava", "llava_next")
# Named special tokens the template may refer to, as transformers passes them.
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    return dict(json.loads(path.read_text(encoding="utf-8"))) if path.exists() else {}


def _pick(template: Any) -> str | None:
    """One template out of a string, a {name: template} mapping or a [{name, template}] list ("default")."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        template = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
    if isinstance(template, dict) and isinstance(template.get("default"), str):
        return str(template["default"])
    return None


def find_chat_template(folder: Path) -> str | None:
    """The processor's chat template as transformers finds it, falling back to the tokenizer's."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = _pick(_read(folder, name).get("chat_template"))
        if template:
            return template
    return None


def compile_template(source: str) -> Any:
    """A jinja2 template in the sandboxed environment transformers renders chat templates in."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # `{% generation %}` marks assistant text for training masks; when rendering it only passes the text on.
        tags = {"generation"}  # noqa: RUF012  (jinja reads it from the class)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        # Jinja's own filter escapes HTML characters, which a prompt must not contain.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A converted model folder's chat template, tokenizer and image settings, used to build prompts."""

    def __init__(self, model_dir: str | Path) -> None:
        import openvino_genai

        folder = Path(model_dir)
        config = _read(folder, "config.json")
        self.model_type: str = str(config.get("model_type", ""))
        if self.model_type not in SUPPORTED:
            raise EngineError(f"Models of type {self.model_type or 'unknown'!r} are not supported (only LLaVA).")
        text_config = config.get("text_config", config)
        self.context_window: int = int(text_config.get("max_position_embeddings", 4096))
        tokenizer_config = _read(folder, "tokenizer_config.json")
        processor_config = _read(folder, "processor_config.json")
        self.image_token: str = str(
            processor_config.get("image_token") or tokenizer_config.get("image_token") or "<image>"
        )
        named = {name: tokenizer_config.get(name) for name in _SPECIAL}
        named.update(tokenizer_config.get("model_specific_special_tokens") or {})  # e.g. image_token
        self.special_tokens = {name: text for name, value in named.items() if (text := _token_text(value)) is not None}
        self.settings = preprocess.ImageSettings.load(folder)
        # The OpenVINO tokenizer: the same ids as the original tokenizer, without transformers.
        self.tokenizer: Any = openvino_genai.Tokenizer(str(folder))
        source = find_chat_template(folder) or self.tokenizer.chat_template
        if not source:
            raise EngineError(f"The model in {folder} has no chat template.")
        self._template = compile_template(source)
        ids = self._encode(self.image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise EngineError(f"The tokenizer of {folder} does not know the image token {self.image_token!r}.")
        self.image_token_id: int = int(ids[0])

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
        text = self._template.render(
            messages=self.messages(conversation),
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **self.special_tokens,
        )
        return str(text), [ref.image for ref in self.image_refs(conversation)]

    @staticmethod
    def image_refs(conversation: Sequence[Turn]) -> list[ImageRef]:
        """The conversation's images in prompt order, as :meth:`render` places them."""
        return [ref for turn in conversation for ref in turn.images]

    def image_tokens(self, image: Image.Image) -> int:
        """Tokens one image takes in the prompt."""
        return preprocess.image_tokens(self.settings, image.height, image.width)

    def expand(self, text: str, images: Sequence[Image.Image]) -> str:
        """The rendered text with each image token repeated for every feature of its image."""
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(images):
            raise EngineError("The chat template placed a different number of images than were given.")
        pieces = [parts[0]]
        for image, part in zip(images, parts[1:], strict=True):
            pieces.append(self.image_token * self.image_tokens(image) + part)
        return "".join(pieces)

    def _encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        encoded = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return np.asarray(encoded.input_ids.data, dtype=np.int64).reshape(-1)

    def token_ids(self, text: str) -> np.ndarray:
        """Token ids ``int64 [1, T]`` of an (expanded) prompt, with the tokenizer's special tokens added."""
        return np.ascontiguousarray(self._encode(text)[None, :])

    def count_tokens(self, conversation: Sequence[Turn]) -> int:
        """Prompt length in tokens, each image counted as the tokens it expands to."""
        text, images = self.render(conversation)
        # Image tokens are special tokens, split off before the rest is tokenized: expanding one into N adds
        # exactly N - 1 ids. (Counting this way also works when someone typed the image token as text.)
        extra = sum(self.image_tokens(image) - 1 for image in images)
        return int(self._encode(text).shape[-1]) + extra

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """The model's float32 pixel values of one image (see :func:`preprocess.pixel_values`)."""
        return preprocess.pixel_values(image, self.settings)

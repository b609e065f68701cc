"""The OpenAI chat-completions subset that ``llava-bot serve`` speaks: requests in, JSON bodies out.

The subset is what the remote engine sends to OpenVINO Model Server: ``messages`` whose content is a
string or a list of ``text`` and ``image_url`` parts (images as base64 ``data:`` URLs), ``max_tokens`` or
``max_completion_tokens``, ``temperature``, ``top_p``, ``stream``, ``stream_options.include_usage``, and
``ignore_eos`` (an extension OVMS and vLLM accept too). Anything wrong becomes an :class:`ApiError`
with OpenAI's error body.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from bot.engine.base import GenerationSettings, ImageRef, Turn

# Formats a client may send (what the bot accepts from people).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_IMAGE_PIXELS = 40_000_000
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*);base64,(?P<data>.*)", re.DOTALL)
_WHITE = (255, 255, 255)


class ApiError(Exception):
    """A request the server refuses, as OpenAI reports it: ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, code: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}


def invalid(message: str, code: str | None = None) -> ApiError:
    """A 400 for a malformed request."""
    return ApiError(400, message, code)


@dataclass(frozen=True)
class ChatRequest:
    """A parsed chat-completions request."""

    model: str
    conversation: list[Turn]
    max_tokens: int | None
    temperature: float
    top_p: float
    ignore_eos: bool
    stream: bool
    include_usage: bool

    def settings(self, max_new_tokens: int) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p, ignore_eos=self.ignore_eos
        )


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid(f"'{name}' must be a number between {low:g} and {high:g}.", "invalid_value")
    return float(value)


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid("'max_tokens' must be a positive integer.", "invalid_value")
    return value


def parse_chat_request(body: Any) -> ChatRequest:
    """Check a request body and turn it into a conversation; raises :class:`ApiError` (400)."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required.", "missing_required_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list.", "missing_required_parameter")
    if body.get("n", 1) != 1:
        raise invalid("Only n = 1 is supported.", "unsupported_value")
    conversation = [_turn(i, message) for i, message in enumerate(messages)]
    if conversation[-1].role != "user":
        raise invalid("The last message must come from the user.", "invalid_value")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object.")
    return ChatRequest(
        model=model,
        conversation=conversation,
        max_tokens=_max_tokens(body),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        ignore_eos=bool(body.get("ignore_eos", False)),
        stream=bool(body.get("stream", False)),
        include_usage=bool(options.get("include_usage", False)),
    )


def _turn(index: int, message: Any) -> Turn:
    if not isinstance(message, dict):
        raise invalid(f"messages[{index}] must be an object.")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise invalid(f"messages[{index}].role must be 'user' or 'assistant' (got {role!r}).", "unsupported_value")
    content = message.get("content")
    if isinstance(content, str):
        return Turn(role, content)
    if not isinstance(content, list):
        raise invalid(f"messages[{index}].content must be a string or a list of parts.")
    texts: list[str] = []
    images: list[ImageRef] = []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise invalid(f"{where}: only user messages may carry images.", "unsupported_value")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(decode_image(url, where))
        else:
            raise invalid(f"{where} must be a 'text' or 'image_url' part.", "unsupported_value")
    return Turn(role, "\n".join(texts), tuple(images))


def decode_image(url: Any, where: str) -> ImageRef:
    """The image of a base64 ``data:`` URL (its file and its RGB picture); refuses other URLs, bad base64
    and undecodable files."""
    match = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if match is None:
        raise invalid(f"{where}: images must be base64 data: URLs.", "invalid_image_url")
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise invalid(f"{where}: the image is not valid base64.", "invalid_image") from error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
                if opened.width * opened.height > MAX_IMAGE_PIXELS:
                    raise invalid(f"{where}: the image has too many pixels.", "invalid_image")
                opened.load()
                mime = opened.get_format_mimetype() or "application/octet-stream"
                return ImageRef.from_data(data, mime, _rgb(opened))
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, Warning) as error:
        raise invalid(f"{where}: the image could not be decoded.", "invalid_image") from error


def _rgb(image: Image.Image) -> Image.Image:
    # Transparent areas become white, as the bot shows the model its own uploads.
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


# --- answers -----------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(request_id: str, model: str, text: str, finish: str, tokens: dict[str, int]) -> dict[str, Any]:
    """A whole (non-streaming) answer."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        ],
        "usage": tokens,
    }


def chunk(
    request_id: str, model: str, delta: dict[str, str], finish: str | None = None, *, with_usage: bool = False
) -> dict[str, Any]:
    """One streamed piece; with ``include_usage`` every chunk carries ``"usage": null`` as OpenAI's do."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage:
        body["usage"] = None
    return body


def usage_chunk(request_id: str, model: str, tokens: dict[str, int]) -> dict[str, Any]:
    """The last chunk before ``[DONE]`` when the client asked for usage: no choices, only the counts."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": tokens,
    }


def model_entry(name: str, created: int, context_window: int) -> dict[str, Any]:
    """One entry of ``GET /v3/models``; ``max_model_len`` (as vLLM names it) tells clients the context."""
    return {"id": name, "object": "model", "created": created, "owned_by": "llava-bot", "max_model_len": context_window}

"""Prompts, token ids and pixels built without PyTorch equal the transformers processor's, for both families."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.engine import preprocess
from bot.engine.base import EngineError, ImageRef, Turn
from bot.engine.template import ChatTemplate
from tests.conftest import sample_image

# (width, height): a single pixel, a 3-pixel-wide strip, a 3-pixel-high strip, a large photo, a not-quite
# square and an exact CLIP-sized square.
ODD_SIZES = [(1, 1), (3, 500), (500, 3), (4000, 3000), (337, 335), (336, 336)]
FAMILIES = ["tiny_llava", "tiny_llava_next"]


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Random pixels: every resampling weight shows in the result, so rounding differences cannot hide."""
    width, height = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> tuple[ChatTemplate, Any]:
    """Our template and transformers' processor for the FP16 folder of one tiny model."""
    from transformers import AutoProcessor

    folder = request.getfixturevalue(request.param)[1] / "FP16"
    return ChatTemplate(folder), AutoProcessor.from_pretrained(folder)


def reference(processor: Any, conversation: list[Turn]) -> tuple[str, Any]:
    messages = ChatTemplate.messages(conversation)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [ref.image for turn in conversation for ref in turn.images]
    return text, processor(images=images or None, text=text, return_tensors="np")


@pytest.mark.parametrize("size", ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pixels_and_token_ids_equal_the_processors(model: tuple[ChatTemplate, Any], size: tuple[int, int]) -> None:
    template, processor = model
    conversation = [Turn("user", "What is unusual in this picture?", (ImageRef.from_image(noise(size, seed=size[0])),))]
    expected_text, expected = reference(processor, conversation)
    text, images = template.render(conversation)
    assert text == expected_text

    ids = template.token_ids(template.expand(text, images))
    assert ids.dtype == np.int64
    assert np.array_equal(ids, expected["input_ids"])
    assert template.count_tokens(conversation) == expected["input_ids"].shape[-1]

    pixels = template.pixel_values(images[0])
    wanted = np.asarray(expected["pixel_values"][0])
    assert pixels.dtype == np.float32 and pixels.shape == wanted.shape
    assert np.array_equal(pixels, wanted), f"max difference {np.abs(pixels - wanted).max()}"


def test_a_conversation_of_several_images_and_turns(model: tuple[ChatTemplate, Any]) -> None:
    """Several images of different shapes (NeXT: different token counts) across turns, in order."""
    template, processor = model
    conversation = [
        Turn(
            "user",
            "Compare these two.",
            (
                ImageRef.from_image(sample_image((160, 100), seed=1)),
                ImageRef.from_image(sample_image((60, 150), seed=2)),
            ),
        ),
        Turn("assistant", "The first is wider; naïve café 🙂."),
        Turn("user", "And this one?", (ImageRef.from_image(sample_image((112, 112), seed=3)),)),
    ]
    expected_text, expected = reference(processor, conversation)
    text, images = template.render(conversation)
    assert text == expected_text
    assert np.array_equal(template.token_ids(template.expand(text, images)), expected["input_ids"])
    for index, image in enumerate(images):
        wanted = np.asarray(expected["pixel_values"][index])
        pixels = template.pixel_values(image)
        assert np.array_equal(pixels, wanted[: len(pixels)] if pixels.ndim == 4 else wanted)


def test_text_only_prompts_count_like_the_tokenizer(model: tuple[ChatTemplate, Any]) -> None:
    template, processor = model
    conversation = [Turn("user", "tabs\tand  double  spaces, 日本語 ✓ </s> <image> literal")]
    _, expected = reference(processor, conversation)
    assert template.count_tokens(conversation) == expected["input_ids"].shape[-1]


def test_genai_sees_the_processors_crop(tiny_llava: tuple[Path, Path]) -> None:
    """LLaVA-1.5 images reach genai already resized and cropped exactly as the reference crops them."""
    from transformers import AutoProcessor

    folder = tiny_llava[1] / "FP16"
    settings = preprocess.ImageSettings.load(folder)
    image_processor = AutoProcessor.from_pretrained(folder).image_processor
    for size in ODD_SIZES:
        image = noise(size, seed=7)
        wanted = image_processor([image], do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
        crop = preprocess.clip_crop(image, settings)
        assert crop.dtype == np.uint8
        assert np.array_equal(crop.transpose(2, 0, 1), wanted), size


@pytest.mark.parametrize("height, width", [(1, 56), (61, 1), (2, 7), (55, 56), (300, 9), (9, 300), (111, 113)])
def test_resize_equals_the_processors_resize(tiny_llava: tuple[Path, Path], height: int, width: int) -> None:
    """Up and down, one axis or both, to sizes with awkward ratios. (A 1x1 target is left out: PyTorch's own
    kernel fails on it, and no model asks for it.)"""
    import torch
    from transformers import AutoProcessor
    from transformers.image_utils import SizeDict

    image_processor = AutoProcessor.from_pretrained(tiny_llava[1] / "FP16").image_processor
    source = np.asarray(noise((97, 61), seed=height * width))
    tensor = torch.from_numpy(source).permute(2, 0, 1).contiguous()
    wanted = image_processor.resize(tensor, SizeDict(height=height, width=width), resample=preprocess.BICUBIC)
    assert np.array_equal(preprocess.resize(source, height, width), wanted.permute(1, 2, 0).numpy())


def test_unknown_model_families_are_refused(tmp_path: Path, tiny_llava: tuple[Path, Path]) -> None:
    for name in ("config.json", "tokenizer_config.json", "openvino_tokenizer.xml", "openvino_tokenizer.bin"):
        (tmp_path / name).write_bytes((tiny_llava[1] / "FP16" / name).read_bytes())
    config = (tmp_path / "config.json").read_text().replace('"model_type": "llava"', '"model_type": "qwen2_vl"')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(EngineError, match="not supported"):
        ChatTemplate(tmp_path)

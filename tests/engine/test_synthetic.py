"""The synthetic checkpoint loads in transformers and answers an image question through its chat template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.synthetic import IMAGE_ID, SPECIAL_TOKENS, TINY, TINY_NEXT, SyntheticSpec, build_checkpoint


@pytest.mark.parametrize("spec", [TINY, TINY_NEXT], ids=["llava", "llava_next"])
def test_tiny_checkpoint_generates_for_image_and_question(tmp_path: Path, spec: SyntheticSpec) -> None:
    # Imported here, not at the top: every test process collects this module, and these imports cost seconds.
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = build_checkpoint(tmp_path / "model", spec)

    assert json.loads((folder / "preprocessor_config.json").read_text())["crop_size"] == {
        "height": spec.image_size,
        "width": spec.image_size,
    }
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert len(processor.tokenizer) == spec.vocab_size

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is in this image? ASSISTANT:"

    pixels = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    inputs = processor(images=[Image.fromarray(pixels)], text=prompt, return_tensors="pt")
    if spec.family == "llava":
        assert int((inputs["input_ids"] == IMAGE_ID).sum()) == spec.image_seq_length

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    # The synthetic model never emits special tokens, so it cannot stop early.
    assert len(new_tokens) == 6
    special_ids = set(processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    assert special_ids.isdisjoint(new_tokens.tolist())
    text = processor.decode(new_tokens, skip_special_tokens=True)
    assert text.strip() and text.isprintable()

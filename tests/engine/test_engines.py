"""Both engines against the transformers reference, every precision, streaming and cancellation."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from bot.engine.base import Engine, GenerationSettings, ImageRef, Turn
from bot.engine.manager import ModelManager, load_engine
from tests.conftest import F32, sample_image

ENGINES = ("genai", "optimum")
NEW_TOKENS = 24


def reference_text(checkpoint: Path, conversation: list[Turn], new_tokens: int) -> str:
    """Greedy answer of the transformers PyTorch model, weights rounded to fp16 like the FP16 IR."""
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from bot.engine.template import ChatTemplate

    config = AutoConfig.from_pretrained(checkpoint)
    model_class: Any = (
        LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration
    )
    model = model_class.from_pretrained(checkpoint).half().float().eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    text = processor.apply_chat_template(
        ChatTemplate.messages(conversation), add_generation_prompt=True, tokenize=False
    )
    images = [ref.image for turn in conversation for ref in turn.images]
    inputs = processor(images=images or None, text=text, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return str(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[-1] :], skip_special_tokens=True))


async def answer(engine: Engine, conversation: list[Turn], **settings: Any) -> tuple[str, list[str]]:
    stream = engine.generate(conversation, GenerationSettings(**settings))
    pieces = [piece async for piece in stream]
    return "".join(pieces), pieces


@pytest.fixture(scope="module")
def conversation() -> list[Turn]:
    return [Turn("user", "What is unusual in this picture?", (ImageRef.from_image(sample_image()),))]


@pytest.mark.parametrize("kind", ENGINES)
async def test_fp16_matches_pytorch_reference(
    tiny_llava: tuple[Path, Path], kind: str, conversation: list[Turn]
) -> None:
    checkpoint, out = tiny_llava
    expected = reference_text(checkpoint, conversation, NEW_TOKENS)
    assert expected.strip(), "the reference produced no text; the fixture model is unusable"
    engine = await asyncio.to_thread(load_engine, kind, out / "FP16", "CPU", F32)
    try:
        text, _ = await answer(engine, conversation, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    finally:
        engine.close()
    assert text == expected


async def test_follow_up_turns_match_reference(tiny_llava: tuple[Path, Path]) -> None:
    """A multi-turn conversation renders through the chat template the same way in both engines."""
    checkpoint, out = tiny_llava
    conversation = [
        Turn("user", "Describe the image.", (ImageRef.from_image(sample_image(seed=2)),)),
        Turn("assistant", "a red ball on the grass"),
        Turn("user", "And what colour is it?"),
    ]
    expected = reference_text(checkpoint, conversation, 12)
    for kind in ENGINES:
        engine = await asyncio.to_thread(load_engine, kind, out / "FP16", "CPU", F32)
        try:
            text, _ = await answer(engine, conversation, max_new_tokens=12, ignore_eos=True)
        finally:
            engine.close()
        assert text == expected, kind


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("precision", ["INT8", "INT4"])
async def test_compressed_variants_generate(
    tiny_llava: tuple[Path, Path], kind: str, precision: str, conversation: list[Turn]
) -> None:
    engine = await asyncio.to_thread(load_engine, kind, tiny_llava[1] / precision)
    try:
        text, _ = await answer(engine, conversation, max_new_tokens=8, ignore_eos=True)
    finally:
        engine.close()
    assert text.strip()


def test_compressed_language_model_sizes(tiny_llava: tuple[Path, Path]) -> None:
    out = tiny_llava[1]
    size = {p: (out / p / "openvino_language_model.bin").stat().st_size for p in ("FP16", "INT8", "INT4")}
    assert size["INT8"] <= 0.55 * size["FP16"]
    assert size["INT4"] <= 0.35 * size["FP16"]


@pytest.mark.parametrize("kind", ENGINES)
async def test_llava_next_matches_reference(tiny_llava_next: tuple[Path, Path], kind: str) -> None:
    checkpoint, out = tiny_llava_next
    engine = await asyncio.to_thread(load_engine, kind, out / "FP16", "CPU", F32)
    try:
        # Wide, tall and square pictures land on different tile grids.
        for size in ((160, 100), (60, 150), (112, 112)):
            conversation = [Turn("user", "What is in the picture?", (ImageRef.from_image(sample_image(size)),))]
            expected = reference_text(checkpoint, conversation, 12)
            text, _ = await answer(engine, conversation, max_new_tokens=12, ignore_eos=True)
            assert text == expected, size
    finally:
        engine.close()
    int4 = await asyncio.to_thread(load_engine, kind, out / "INT4")
    try:
        text, _ = await answer(int4, conversation, max_new_tokens=6, ignore_eos=True)
    finally:
        int4.close()
    assert text.strip()


@pytest.mark.parametrize("kind", ENGINES)
async def test_streams_pieces_cancels_and_keeps_the_loop_free(
    tiny_llava: tuple[Path, Path], kind: str, conversation: list[Turn]
) -> None:
    engine = await asyncio.to_thread(load_engine, kind, tiny_llava[1] / "INT4")
    try:
        # The loop keeps ticking while a long answer is generated.
        ticks: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        ticking = asyncio.create_task(ticker())
        text, pieces = await answer(engine, conversation, max_new_tokens=200, ignore_eos=True)
        stop.set()
        await ticking
        assert len(pieces) >= 5, "the answer arrived in one piece instead of streaming"
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert len(ticks) > 20 and max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.3f} s"

        # Cancelling after a few pieces stops generation long before max_new_tokens.
        stream = engine.generate(conversation, GenerationSettings(max_new_tokens=400, ignore_eos=True))
        received = []
        async for piece in stream:
            received.append(piece)
            if len(received) == 3:
                stream.cancel()
        await stream.done
        assert stream.stats.new_tokens < 50

        # Leaving the iteration early (the person's reply was deleted) also frees the engine.
        stream = engine.generate(conversation, GenerationSettings(max_new_tokens=400, ignore_eos=True))
        async for _ in stream:
            break
        await asyncio.wait_for(stream.done, 30)

        # The next request works and is complete.
        again, _ = await answer(engine, conversation, max_new_tokens=200, ignore_eos=True)
        assert again == text
    finally:
        engine.close()


async def test_manager_switches_variant_without_dropping_a_running_request(
    tiny_llava: tuple[Path, Path], conversation: list[Turn]
) -> None:
    manager = ModelManager(tiny_llava[1], "genai")
    assert manager.available() == ["INT4", "INT8", "FP16"]
    await manager.switch("INT4")
    settings = GenerationSettings(max_new_tokens=150, ignore_eos=True)
    running = manager.generate(conversation, settings)
    collected = asyncio.create_task(running.text())
    await manager.switch("int8")
    assert manager.precision == "INT8"
    old_answer = await collected
    assert running.stats.new_tokens == 150 and old_answer
    int8_answer = await manager.generate(conversation, GenerationSettings(max_new_tokens=8, ignore_eos=True)).text()
    assert int8_answer.strip()
    await manager.close()

"""Both engines against the transformers reference, every precision, streaming and cancellation."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.engine.base import Engine, GenerationSettings, ImageRef, Turn
from bot.engine.manager import ModelManager, load_engine
from bot.loopwatch import LoopWatch
from tests.conftest import F32, sample_image

ENGINES = ("genai", "optimum")
NEW_TOKENS = 24


@functools.cache
def reference_model(checkpoint: Path) -> tuple[Any, Any]:
    """(model, processor) of the transformers PyTorch checkpoint, weights rounded to fp16 like the FP16 IR.

    Loaded once per checkpoint: generating never changes them, and every reference answer starts from the prompt.
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    config = AutoConfig.from_pretrained(checkpoint)
    model_class: Any = (
        LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration
    )
    model = model_class.from_pretrained(checkpoint).half().float().eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


def reference_text(checkpoint: Path, conversation: list[Turn], new_tokens: int) -> str:
    """Greedy answer of the transformers PyTorch model, weights rounded to fp16 like the FP16 IR."""
    import torch

    from bot.engine.template import ChatTemplate

    model, processor = reference_model(checkpoint)
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


# How often the loop watch asks to run while an engine generates: a blocked loop shows as one long lag.
TICK = 0.005


def assert_loop_kept_ticking(watch: LoopWatch) -> None:
    """The loop ran the watch's timer throughout: many times, and never more than half a second apart."""
    lag = watch.summary()
    longest_gap = TICK + lag.worst_ms / 1000
    assert lag.samples > 20 and longest_gap < 0.5, f"the event loop stalled for {longest_gap:.3f} s"


@pytest.fixture(scope="module")
def conversation() -> list[Turn]:
    return [Turn("user", "What is unusual in this picture?", (ImageRef.from_image(sample_image()),))]


async def _engines(folder: Path, ov_config: dict[str, str] | None) -> AsyncIterator[dict[str, Engine]]:
    engines: dict[str, Engine] = {}
    try:
        for kind in ENGINES:
            engines[kind] = await asyncio.to_thread(load_engine, kind, folder, "CPU", ov_config)
        yield engines
    finally:
        for engine in engines.values():
            await asyncio.to_thread(engine.close)


@pytest.fixture(scope="module")
async def exact(tiny_llava: tuple[Path, Path]) -> AsyncIterator[dict[str, Engine]]:
    """Each engine on the FP16 folder in f32, shared by the tests that compare it with the reference."""
    async for engines in _engines(tiny_llava[1] / "FP16", F32):
        yield engines


@pytest.fixture(scope="module")
async def int4(tiny_llava: tuple[Path, Path]) -> AsyncIterator[dict[str, Engine]]:
    """Each engine on the INT4 folder with its default settings, as a bot runs it."""
    async for engines in _engines(tiny_llava[1] / "INT4", None):
        yield engines


@pytest.mark.parametrize("kind", ENGINES)
async def test_fp16_matches_pytorch_reference(
    tiny_llava: tuple[Path, Path], kind: str, conversation: list[Turn], exact: dict[str, Engine]
) -> None:
    expected = reference_text(tiny_llava[0], conversation, NEW_TOKENS)
    assert expected.strip(), "the reference produced no text; the fixture model is unusable"
    text, _ = await answer(exact[kind], conversation, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert text == expected


async def test_follow_up_turns_match_reference(tiny_llava: tuple[Path, Path], exact: dict[str, Engine]) -> None:
    """A multi-turn conversation renders through the chat template the same way in both engines."""
    conversation = [
        Turn("user", "Describe the image.", (ImageRef.from_image(sample_image(seed=2)),)),
        Turn("assistant", "a red ball on the grass"),
        Turn("user", "And what colour is it?"),
    ]
    expected = reference_text(tiny_llava[0], conversation, 12)
    for kind in ENGINES:
        text, _ = await answer(exact[kind], conversation, max_new_tokens=12, ignore_eos=True)
        assert text == expected, kind


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("precision", ["INT8", "INT4"])
async def test_compressed_variants_generate(
    tiny_llava: tuple[Path, Path], kind: str, precision: str, conversation: list[Turn], int4: dict[str, Engine]
) -> None:
    if precision == "INT4":
        text, _ = await answer(int4[kind], conversation, max_new_tokens=8, ignore_eos=True)
    else:
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


def next_question(size: tuple[int, int]) -> list[Turn]:
    return [Turn("user", "What is in the picture?", (ImageRef.from_image(sample_image(size)),))]


# Wide, tall and square pictures land on different tile grids.
NEXT_SIZES = ((160, 100), (60, 150), (112, 112))


@pytest.fixture(scope="module")
def next_references(tiny_llava_next: tuple[Path, Path]) -> dict[tuple[int, int], str]:
    """The reference's answers about each picture size, computed once for both engines."""
    return {size: reference_text(tiny_llava_next[0], next_question(size), 12) for size in NEXT_SIZES}


@pytest.mark.parametrize("kind", ENGINES)
async def test_llava_next_matches_reference(
    tiny_llava_next: tuple[Path, Path], kind: str, next_references: dict[tuple[int, int], str]
) -> None:
    out = tiny_llava_next[1]
    engine = await asyncio.to_thread(load_engine, kind, out / "FP16", "CPU", F32)
    try:
        for size, expected in next_references.items():
            conversation = next_question(size)
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
    kind: str, conversation: list[Turn], int4: dict[str, Engine]
) -> None:
    engine = int4[kind]
    # The loop keeps ticking while a long answer is generated.
    watch = LoopWatch(interval=TICK)
    watch.start()
    text, pieces = await answer(engine, conversation, max_new_tokens=200, ignore_eos=True)
    await watch.stop()
    assert len(pieces) >= 5, "the answer arrived in one piece instead of streaming"
    assert_loop_kept_ticking(watch)

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

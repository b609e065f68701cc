"""The batching engine: batched and reused work gives the answers of work done alone and from scratch."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from bot.engine.base import BatchingOptions, EngineError, GenerationSettings, ImageRef, Turn
from bot.engine.batching import BatchingEngine, EmbedInputs, IncrementalText
from bot.engine.manager import ModelManager, load_engine
from bot.engine.template import ChatTemplate
from bot.loopwatch import LoopWatch
from tests.conftest import F32, sample_image
from tests.engine.test_engines import TICK, answer, assert_loop_kept_ticking, reference_text

KIND = "genai-batching"


async def load(folder: Path, ov_config: dict[str, str] | None = None) -> BatchingEngine:
    engine = await asyncio.to_thread(load_engine, KIND, folder, "CPU", ov_config)
    assert isinstance(engine, BatchingEngine)
    return engine


@pytest.fixture(scope="module")
async def engine(tiny_llava: tuple[Path, Path]) -> AsyncIterator[BatchingEngine]:
    """One exact-precision engine shared by the tests that only compare it with itself or fresh engines."""
    loaded = await load(tiny_llava[1] / "FP16", F32)
    yield loaded
    await asyncio.to_thread(loaded.close)


def channels() -> list[list[Turn]]:
    """Four channels' questions, each about its own picture."""
    questions = ["What is unusual in this picture?", "Describe the colours.", "Is it a photo?", "What is on the left?"]
    return [
        [Turn("user", q, (ImageRef.from_image(sample_image((120 + 30 * i, 90), seed=i)),))]
        for i, q in enumerate(questions)
    ]


async def test_concurrent_answers_match_each_run_alone(tiny_llava: tuple[Path, Path], engine: BatchingEngine) -> None:
    """Four channels batched together get the greedy answers each gets alone, and the reference's."""
    checkpoint, out = tiny_llava
    conversations = channels()
    batched = await load(out / "FP16", F32)
    try:
        streams = [batched.generate(c, GenerationSettings(max_new_tokens=48, ignore_eos=True)) for c in conversations]
        together = await asyncio.gather(*(s.text() for s in streams))
    finally:
        batched.close()
    # All four were in flight at once: every first token came before any answer was complete.
    assert max(s.stats.first_token or 0 for s in streams) < min(s.stats.finished or 0 for s in streams)
    assert all(s.stats.new_tokens == 48 for s in streams)

    # Another engine, so nothing is reused from the batched run.
    separately = [(await answer(engine, c, max_new_tokens=48, ignore_eos=True))[0] for c in conversations]
    assert together == separately
    assert len(set(together)) > 1, "the channels should get different answers"
    assert together[0] == reference_text(checkpoint, conversations[0], 48)


async def test_follow_up_after_interleaving_reuses_work_and_matches_from_scratch(
    tiny_llava: tuple[Path, Path], engine: BatchingEngine
) -> None:
    """Channel A, channel B, then A's follow-up: A's image is not encoded again and the answer is the one
    computed from scratch; a reset (a new image) is encoded and answered afresh."""
    checkpoint, out = tiny_llava
    a, b = channels()[:2]
    first, _ = await answer(engine, a, max_new_tokens=16, ignore_eos=True)
    await answer(engine, b, max_new_tokens=16, ignore_eos=True)
    follow_up = [*a, Turn("assistant", first), Turn("user", "And what colour is it?")]
    encoded = engine.images_encoded
    reused, _ = await answer(engine, follow_up, max_new_tokens=16, ignore_eos=True)
    assert engine.images_encoded == encoded, "the follow-up encoded its image again"
    assert engine.images_reused >= 1

    fresh = await load(out / "FP16", F32)
    try:
        from_scratch, _ = await answer(fresh, follow_up, max_new_tokens=16, ignore_eos=True)
        assert fresh.images_encoded == 1 and fresh.images_reused == 0
    finally:
        fresh.close()
    assert reused == from_scratch
    assert reused == reference_text(checkpoint, follow_up, 16)

    # The same words about a different picture do not extend A's conversation: the new image is encoded.
    other = [Turn("user", a[0].text, (ImageRef.from_image(sample_image((100, 100), seed=7)),)), *follow_up[1:]]
    await answer(engine, other, max_new_tokens=4, ignore_eos=True)
    assert engine.images_encoded == encoded + 1


def test_prompt_of_a_seen_image_is_built_exactly_as_the_processor_builds_it(engine: BatchingEngine) -> None:
    """A follow-up skips resizing its image; its token ids and pixels are still the transformers processor's."""
    from transformers import AutoProcessor

    conversation = [Turn("user", "Look at this.", (ImageRef.from_image(sample_image((200, 150), seed=5)),))]
    follow_up = [*conversation, Turn("assistant", "I see it."), Turn("user", "Is it round?")]
    first = engine.inputs(conversation)
    again = engine.inputs(follow_up)
    assert isinstance(first, EmbedInputs) and isinstance(again, EmbedInputs)
    processor = AutoProcessor.from_pretrained(engine.model_dir)
    text = processor.apply_chat_template(ChatTemplate.messages(follow_up), add_generation_prompt=True, tokenize=False)
    images = [ref.image for turn in follow_up for ref in turn.images]
    expected = processor(images=images, text=text, return_tensors="np")
    assert np.array_equal(again.input_ids, expected["input_ids"])
    assert again.images[0][0] == first.images[0][0]
    assert np.array_equal(again.images[0][1][0], expected["pixel_values"][0])


async def test_cancelling_one_stream_stops_it_and_the_others_complete(engine: BatchingEngine) -> None:
    conversations = channels()
    # Long enough that a cancel that did not stop the stream would reach the limit below; no longer, since the
    # other three generate every token.
    settings = GenerationSettings(max_new_tokens=400, ignore_eos=True)
    streams = [engine.generate(c, settings) for c in conversations]
    others = asyncio.gather(*(s.text() for s in streams[1:]))
    received = []
    async for piece in streams[0]:
        received.append(piece)
        if len(received) == 3:
            streams[0].cancel()
    await asyncio.wait_for(streams[0].done, 30)
    assert streams[0].stats.new_tokens < 300, "the cancelled stream kept generating"
    texts = await asyncio.wait_for(others, 120)
    assert all(s.stats.new_tokens == settings.max_new_tokens for s in streams[1:])
    assert all(texts)

    # Leaving the iteration early (the person's reply was deleted) also stops the request.
    stream = engine.generate(conversations[0], settings)
    async for _ in stream:
        break
    await asyncio.wait_for(stream.done, 30)
    assert stream.stats.new_tokens < 300


async def test_streams_pieces_while_the_event_loop_keeps_ticking(tiny_llava: tuple[Path, Path]) -> None:
    engine = await load(tiny_llava[1] / "INT4")
    try:
        watch = LoopWatch(interval=TICK)
        watch.start()
        results = await asyncio.gather(
            *(answer(engine, c, max_new_tokens=300, ignore_eos=True) for c in channels()),
        )
        await watch.stop()
        for text, pieces in results:
            assert len(pieces) >= 5, "the answer arrived in one piece instead of streaming"
            assert "".join(pieces) == text and text.strip()
        assert_loop_kept_ticking(watch)
    finally:
        engine.close()


async def test_llava_next_goes_through_genai_image_handling(tiny_llava_next: tuple[Path, Path]) -> None:
    """LLaVA-NeXT images go through genai's own encoder: the answer matches the reference, and a follow-up
    (whose KV prefix is reused) matches the same follow-up computed from scratch."""
    checkpoint, out = tiny_llava_next
    conversation = [Turn("user", "What is in the picture?", (ImageRef.from_image(sample_image((160, 100))),))]
    follow_up = [*conversation, Turn("assistant", "a ball"), Turn("user", "Where is it?")]
    engine = await load(out / "FP16", F32)
    try:
        first, _ = await answer(engine, conversation, max_new_tokens=12, ignore_eos=True)
        await answer(engine, channels()[1], max_new_tokens=4, ignore_eos=True)
        second, _ = await answer(engine, follow_up, max_new_tokens=12, ignore_eos=True)
        assert engine.images_encoded == 0, "LLaVA-NeXT features are not built in this process"
    finally:
        engine.close()
    assert first == reference_text(checkpoint, conversation, 12)
    fresh = await load(out / "FP16", F32)
    try:
        from_scratch, _ = await answer(fresh, follow_up, max_new_tokens=12, ignore_eos=True)
    finally:
        fresh.close()
    # Not compared with the transformers reference: genai's own VLMPipeline differs from it on this
    # multi-turn LLaVA-NeXT prompt too (after a few tokens), with or without reuse.
    assert second == from_scratch


async def test_closed_engine_refuses_and_ends_streams(tiny_llava: tuple[Path, Path]) -> None:
    engine = await load(tiny_llava[1] / "INT4")
    running = engine.generate(channels()[0], GenerationSettings(max_new_tokens=1900, ignore_eos=True))
    async for _ in running:
        break
    await asyncio.to_thread(engine.close)
    await asyncio.wait_for(running.done, 30)
    with pytest.raises(Exception, match="unloaded"):
        await engine.generate(channels()[1], GenerationSettings(max_new_tokens=4)).text()


def child_processes() -> set[int]:
    """Processes whose parent is this one, running or not yet reaped (Linux /proc)."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # The fields after the parenthesised command name: state, parent pid, ...
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(fields[1]) == os.getpid():
                    children.add(int(entry.name))
    return children


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_model_that_fails_to_load_raises_and_leaves_no_process(tiny_llava: tuple[Path, Path], tmp_path: Path) -> None:
    broken = tmp_path / "FP16"
    shutil.copytree(tiny_llava[1] / "FP16", broken)
    (broken / "openvino_language_model.xml").write_text("<net>not a model</net>")
    before = child_processes()
    with pytest.raises(EngineError, match="Cannot load the model"):
        BatchingEngine(str(broken))
    assert child_processes() <= before


@pytest.mark.parametrize(
    "text",
    [
        "naïve café, déjà vu",
        "日本語のテキストと絵文字 🙂🎉 mixed with English words",
        "tabs\tand  double  spaces, trailing space ",
        "Ünïcödé ✓ — “quotes” and €uro",
    ],
)
def test_incremental_text_pieces_concatenate_to_the_final_text(tiny_llava: tuple[Path, Path], text: str) -> None:
    """Token by token, multi-byte characters split across byte tokens never leak half a character."""
    tokenizer = ChatTemplate(tiny_llava[1] / "FP16").tokenizer
    ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False).input_ids.data[0]]
    final = tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) > len(text.split()), "the text should need several tokens per word somewhere"
    decoder = IncrementalText(tokenizer)
    pieces = [decoder.add([token]) for token in ids]
    pieces.append(decoder.finish())
    assert "".join(pieces) == final
    assert all("\ufffd" not in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) >= 3


async def test_configured_options_reach_the_pipeline(tiny_llava: tuple[Path, Path], engine: BatchingEngine) -> None:
    """One answer at a time makes the second question wait for the first; tiny prefill chunks still give the
    same answers; without an image cache a follow-up encodes its image again."""
    options = BatchingOptions(kv_cache_gb=1, max_batched_tokens=16, image_cache_size=0, concurrency=1)
    manager = ModelManager(tiny_llava[1], KIND, "CPU", F32, batching=options)  # as the bot builds it
    await manager.switch("FP16")
    engine_alone = manager.engine
    assert isinstance(engine_alone, BatchingEngine)
    try:
        assert manager.concurrency == 1  # what the bot's scheduler admits at once
        first, second = channels()[:2]
        settings = GenerationSettings(max_new_tokens=8, ignore_eos=True)
        streams = [engine_alone.generate(c, settings) for c in (first, second)]
        texts = await asyncio.gather(*(s.text() for s in streams))
        assert (streams[1].stats.first_token or 0) >= (streams[0].stats.finished or 0), "the second did not wait"
        assert texts == [(await answer(engine, c, max_new_tokens=8, ignore_eos=True))[0] for c in (first, second)]
        encoded = engine_alone.images_encoded
        follow_up = [*first, Turn("assistant", texts[0]), Turn("user", "And what colour is it?")]
        await answer(engine_alone, follow_up, max_new_tokens=2, ignore_eos=True)
        assert engine_alone.images_encoded == encoded + 1
    finally:
        await manager.close()


def test_a_bad_option_is_refused_naming_it(tiny_llava: tuple[Path, Path]) -> None:
    with pytest.raises(EngineError, match="concurrency must be between 1 and 64, got 0"):
        BatchingEngine(str(tiny_llava[1] / "INT4"), options=BatchingOptions(concurrency=0))

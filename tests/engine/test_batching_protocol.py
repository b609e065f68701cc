"""The batching engine's parts that need no model: the messages between the processes, the detokeniser, the LRU."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection

import numpy as np
import pytest

from bot.engine.base import EngineError, GenerationSettings
from bot.engine.batching.detokenize import IncrementalText
from bot.engine.batching.protocol import (
    Add,
    Close,
    EmbedInputs,
    Failed,
    Images,
    ParentEnd,
    PromptInputs,
    Ready,
    Stop,
    Update,
    Updates,
    WorkerEnd,
    WorkerOptions,
    describe,
    ended,
)
from bot.engine.lru import LruCache


@pytest.fixture
def ends() -> Iterator[tuple[ParentEnd, WorkerEnd]]:
    """Both ends of a real socket pair, as the engine and its worker process hold them."""
    ours, theirs = socket.socketpair()
    parent, worker = ParentEnd(Connection(ours.detach())), WorkerEnd(Connection(theirs.detach()))
    yield parent, worker
    parent.close()
    worker.conn.close()


def test_every_request_crosses_the_pipe_intact(ends: tuple[ParentEnd, WorkerEnd]) -> None:
    parent, worker = ends
    options = WorkerOptions("/models/x", "CPU", {"INFERENCE_PRECISION_HINT": "f32"}, 2, 256, 16, 4, 32000)
    ids = np.arange(12, dtype=np.int64)[None]
    pixels = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    embed = Add(7, EmbedInputs(ids, (("digest", pixels),)), GenerationSettings(max_new_tokens=9, temperature=0.5))
    tagged = Add(8, PromptInputs("<ov_genai_image_0> hi", (np.zeros((4, 4, 3), np.uint8),)), GenerationSettings())
    parent.send(options)
    for message in (embed, tagged, Stop(7), Close()):
        parent.send(message)
    assert worker.options() == options
    got_embed, got_tagged, stop, close = (worker.recv() for _ in range(4))
    assert isinstance(got_embed, Add) and isinstance(got_embed.inputs, EmbedInputs)
    assert got_embed.request_id == 7 and got_embed.settings == embed.settings
    assert np.array_equal(got_embed.inputs.input_ids, ids)
    assert got_embed.inputs.images[0][0] == "digest" and np.array_equal(got_embed.inputs.images[0][1], pixels)
    assert isinstance(got_tagged, Add) and isinstance(got_tagged.inputs, PromptInputs)
    assert got_tagged.inputs.prompt == "<ov_genai_image_0> hi" and got_tagged.inputs.images[0].shape == (4, 4, 3)
    assert stop == Stop(7) and close == Close()


def test_every_report_crosses_the_pipe_intact(ends: tuple[ParentEnd, WorkerEnd]) -> None:
    parent, worker = ends
    updates = Updates((Update(3, (5, 6), False), Update(4, (), True, "busy", 120), ended(5, "failed")))
    worker.send(Ready())
    worker.send(updates)
    worker.send(Images(encoded=1, reused=2))
    assert parent.started() == Ready()
    assert parent.recv() == updates
    assert parent.recv() == Images(1, 2)
    worker.send(Failed("no such model"))
    with pytest.raises(TypeError):  # a start report is not an update: the reader would misread it
        parent.recv()


def test_a_message_of_another_shape_is_refused_not_misread(ends: tuple[ParentEnd, WorkerEnd]) -> None:
    parent, worker = ends
    parent.conn.send(("add", 1, None, GenerationSettings()))  # the untyped form of a request
    with pytest.raises(TypeError, match="tuple"):
        worker.recv()
    worker.conn.send(("updates", [(1, [2], False, None, 0)]))
    with pytest.raises(TypeError, match="tuple"):
        parent.recv()


def test_a_closed_end_is_seen_as_the_other_process_gone(ends: tuple[ParentEnd, WorkerEnd]) -> None:
    parent, worker = ends
    parent.close()
    with pytest.raises(EOFError):
        worker.recv()


def test_an_ended_request_carries_no_tokens_and_its_error() -> None:
    assert ended(9) == Update(9, (), True, None, 0)
    assert ended(9, "The model failed.").error == "The model failed."


def test_failures_are_described_as_sentences_without_internals() -> None:
    assert describe(EngineError("The prompt's image tokens do not match.")) == "The prompt's image tokens do not match."
    sentence = describe(RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:223"))
    assert sentence == "The model failed while answering (RuntimeError)."


class _ByteTokenizer:
    """One token per UTF-8 byte, decoded as a real tokenizer does: an incomplete character becomes U+FFFD."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_pieces_hold_back_partial_characters_and_trailing_spaces() -> None:
    text = "héllo wörld  🙂 end "
    decoder = IncrementalText(_ByteTokenizer())
    pieces = [decoder.add([byte]) for byte in text.encode()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert not any(piece.endswith(" ") for piece in pieces), "trailing spaces are released with the next word"
    pieces.append(decoder.finish())
    assert "".join(pieces) == text
    assert pieces[-1] == " ", "the final space comes only at the end"


def test_a_decoding_that_rewrites_the_past_is_not_streamed(caplog: pytest.LogCaptureFixture) -> None:
    class Rewriting(_ByteTokenizer):
        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            return "abc" if len(ids) < 3 else "xyz!"

    decoder = IncrementalText(Rewriting())
    assert decoder.add([1]) == "abc"
    with caplog.at_level(logging.WARNING):
        assert decoder.add([2, 3]) == ""
        assert decoder.finish() == ""
    assert "changed" in caplog.text


def test_the_lru_drops_the_least_recently_used_item() -> None:
    cache: LruCache[str, int] = LruCache(2)
    assert cache.put("a", 1) == 1
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now more recent than "b"
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    cache.put("a", 10)  # replacing counts as use
    cache.put("d", 4)
    assert "c" not in cache and cache.get("a") == 10 and len(cache) == 2
    cache.discard("a")
    cache.discard("missing")
    assert "a" not in cache and len(cache) == 1


def test_an_lru_of_size_zero_keeps_nothing() -> None:
    cache: LruCache[str, int] = LruCache(0)
    assert cache.put("a", 1) == 1
    assert cache.get("a") is None and len(cache) == 0

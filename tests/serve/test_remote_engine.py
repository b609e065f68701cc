"""The remote engine (``model.engine = "openai"``) against the real ``llava-bot serve`` process."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import signal
from pathlib import Path

import pytest
from PIL import Image

from bot.config import parse_config
from bot.engine import remote
from bot.engine.base import Engine, EngineError, GenerationSettings, ImageRef, Turn
from bot.engine.remote import RemoteEngine, RemoteSettings
from bot.services import ensure_model, make_model_manager
from tests.conftest import sample_image
from tests.e2e.serve_process import ServeProcess, free_port
from tests.serve.conftest import API_KEY

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEY_ENV = "LLAVA_TEST_REMOTE_KEY"
SETTINGS = GenerationSettings(max_new_tokens=32)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)


def engine_for(server: ServeProcess, **changes: object) -> RemoteEngine:
    options: dict[str, object] = {"base_url": server.base_url, "model": "tiny", "api_key_env": KEY_ENV, **changes}
    return RemoteEngine(RemoteSettings(**options))  # type: ignore[arg-type]


def jpeg_upload(seed: int) -> tuple[bytes, ImageRef]:
    """A stored JPEG and the reference to it, as the chat service passes it on."""
    buffer = io.BytesIO()
    sample_image(seed=seed).save(buffer, "JPEG", quality=92)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as opened:
        return data, ImageRef.from_data(data, "image/jpeg", opened.convert("RGB"))


async def test_streams_the_same_answer_as_the_local_engine(
    served: ServeProcess, in_process: Engine, tiny_llava: tuple[Path, Path]
) -> None:
    data, picture = jpeg_upload(seed=5)
    conversation = [Turn("user", "Describe it.", (picture,))]
    expected = await in_process.generate(conversation, SETTINGS).text()
    engine = engine_for(served, tokenizer_dir=tiny_llava[1] / "FP16")
    try:
        # The stored JPEG travels as it is: re-encoding it would change the pixels the model sees.
        assert remote.image_url(picture).endswith(base64.b64encode(data).decode())
        stream = engine.generate(conversation, SETTINGS)
        pieces = [piece async for piece in stream]
        assert len(pieces) > 1
        assert "".join(pieces) == expected
        assert stream.stats.new_tokens > 0
        assert stream.stats.prompt_tokens == engine.count_prompt_tokens(conversation)
        assert engine.context_window == in_process.context_window
    finally:
        await asyncio.to_thread(engine.close)


async def test_without_a_tokenizer_the_context_window_comes_from_the_server(
    served: ServeProcess, in_process: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "bot.engine.remote")
    engine = await asyncio.to_thread(engine_for, served, context_window=999)
    try:
        assert engine.context_window == in_process.context_window
        assert "prompt lengths are estimated" in caplog.text
        conversation = [Turn("user", "Describe it.", (ImageRef.from_image(sample_image()),))]
        assert engine.count_prompt_tokens(conversation) >= in_process.count_prompt_tokens(conversation)
        assert await engine.health() == "up"
    finally:
        await asyncio.to_thread(engine.close)


async def test_cancelling_closes_the_stream_and_the_server_stops(served: ServeProcess) -> None:
    engine = engine_for(served, context_window=2048)
    before = served.health()
    try:
        stream = engine.generate([Turn("user", "Talk for a long time.")], GenerationSettings(1500, ignore_eos=True))
        async for _ in stream:
            break  # leaving the loop cancels, as Stop, delete and /reset do
        await asyncio.wait_for(stream.done, 30)

        cancelled = before.get("cancelled", 0)
        after = await served.wait_health(lambda h: h["active"] == 0 and h.get("cancelled", 0) > cancelled)
        assert 0 < after.get("tokens", 0) - before.get("tokens", 0) < 1500
    finally:
        await asyncio.to_thread(engine.close)


async def test_a_server_that_is_down_gets_one_sentence_after_retries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.engine.remote")
    settings = RemoteSettings(base_url=f"http://127.0.0.1:{free_port()}/v3", model="tiny", timeout=5)
    engine = await asyncio.to_thread(RemoteEngine, settings)
    try:
        assert engine.context_window == 4096  # the configured fallback: the server could not say
        with pytest.raises(EngineError) as failure:
            await engine.generate([Turn("user", "Hello?")], SETTINGS).text()
        assert str(failure.value) == remote.UNREACHABLE
        assert caplog.text.count("retrying") == len(remote.RETRY_DELAYS)
        assert await engine.health() == "unreachable"
    finally:
        await asyncio.to_thread(engine.close)


async def test_wrong_model_and_wrong_key_get_their_sentences(
    served: ServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_for(served, model="no-such-model", context_window=2048)
    try:
        with pytest.raises(EngineError) as failure:
            await engine.generate([Turn("user", "Hello?")], SETTINGS).text()
        assert str(failure.value) == remote.NO_MODEL.format(model="no-such-model")
    finally:
        await asyncio.to_thread(engine.close)
    monkeypatch.setenv(KEY_ENV, "wrong")
    engine = engine_for(served, context_window=2048)
    try:
        with pytest.raises(EngineError) as failure:
            await engine.generate([Turn("user", "Hello?")], SETTINGS).text()
        assert str(failure.value) == remote.REFUSED_KEY
    finally:
        await asyncio.to_thread(engine.close)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(EngineError, match=KEY_ENV):
        engine_for(served)


async def test_a_server_that_stops_answering_times_out(served: ServeProcess) -> None:
    engine = engine_for(served, context_window=2048, timeout=2.0)
    served.signal(signal.SIGSTOP)  # the port still accepts connections, but nothing answers
    try:
        with pytest.raises(EngineError) as failure:
            await asyncio.wait_for(engine.generate([Turn("user", "Hello?")], SETTINGS).text(), 60)
        assert str(failure.value) == remote.SLOW
    finally:
        served.signal(signal.SIGCONT)
        await asyncio.to_thread(engine.close)
    engine = engine_for(served, context_window=2048)
    try:
        assert await engine.generate([Turn("user", "Hello?")], SETTINGS).text()  # and it answers again
    finally:
        await asyncio.to_thread(engine.close)


async def test_the_manager_loads_it_without_a_model_folder_and_maps_precisions(
    served: ServeProcess, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "model": {
                "engine": "openai",
                "dir": str(tmp_path / "nothing-converted-here"),
                "base_url": served.base_url,
                "api_key_env": KEY_ENV,
                "remote_models": {"int4": "tiny", "FP16": "tiny-fp16"},
            }
        }
    )
    ensure_model(config)  # no converted folder is needed, and none is converted
    assert not (tmp_path / "nothing-converted-here").exists()
    models = make_model_manager(config)
    assert models.available() == ["INT4", "FP16"]
    try:
        await models.switch("INT4")
        assert await models.generate([Turn("user", "Hello?")], SETTINGS).text()
        await models.switch("FP16")
        with pytest.raises(EngineError) as failure:
            await models.generate([Turn("user", "Hello?")], SETTINGS).text()
        assert str(failure.value) == remote.NO_MODEL.format(model="tiny-fp16")
    finally:
        await models.close()

"""``llava-bot serve`` as a client sees it: the OpenAI chat-completions API over real HTTP."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import aiohttp
import openai
import pytest

from bot.engine.base import Engine, GenerationSettings, ImageRef, Turn
from tests.conftest import sample_image
from tests.e2e.serve_process import ServeProcess
from tests.serve.conftest import API_KEY

pytestmark = pytest.mark.asyncio(loop_scope="session")

AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = "What is in this picture?"


def png_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    sample_image(seed=seed).save(buffer, "PNG")
    return buffer.getvalue()


def image_part(data: bytes, mime: str = "image/png") -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def client(server: ServeProcess, prefix: str = "/v3") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.root_url}{prefix}", api_key=API_KEY, max_retries=0)


async def test_lists_its_model_under_v3_and_v1(served: ServeProcess, in_process: Engine) -> None:
    for prefix in ("/v3", "/v1"):
        status, body = served.request("GET", f"{prefix}/models", headers=AUTH)
        assert status == 200
        assert [entry["id"] for entry in body["data"]] == ["tiny"]
        assert body["data"][0]["max_model_len"] == in_process.context_window
    async with client(served) as api:
        assert (await api.models.retrieve("tiny")).id == "tiny"
        with pytest.raises(openai.NotFoundError):
            await api.models.retrieve("other")


async def test_answers_equal_the_in_process_engine_streamed_or_not(served: ServeProcess, in_process: Engine) -> None:
    upload = png_bytes(seed=3)
    picture = ImageRef.from_image(sample_image(seed=3))
    settings = GenerationSettings(max_new_tokens=40)
    first = [Turn("user", QUESTION, (picture,))]
    expected = await in_process.generate(first, settings).text()
    follow_up = [*first, Turn("assistant", expected), Turn("user", "And the colours?")]
    expected_follow_up = await in_process.generate(follow_up, settings).text()
    messages: Any = [{"role": "user", "content": [image_part(upload), {"type": "text", "text": QUESTION}]}]
    async with client(served) as api:
        whole = await api.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=40,
            temperature=0.0,
        )
        assert whole.choices[0].message.content == expected
        assert whole.usage is not None and whole.usage.completion_tokens > 0
        assert whole.usage.prompt_tokens == in_process.count_prompt_tokens(first)

        pieces: list[str] = []
        usage = None
        stream = await api.chat.completions.create(
            model="tiny", messages=messages, max_completion_tokens=40, temperature=0.0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)
            usage = chunk.usage or usage
        assert len([p for p in pieces if p]) > 1, "the answer arrives in pieces"
        assert "".join(pieces) == expected
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens

        messages += [{"role": "assistant", "content": expected}, {"role": "user", "content": "And the colours?"}]
    async with client(served, "/v1") as api:
        again = await api.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=40,
            temperature=0.0,
        )
        assert again.choices[0].message.content == expected_follow_up


GOOD_MESSAGE = {"role": "user", "content": "Hello"}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "tiny", "messages": []}, 400, "missing_required_parameter"),
        ({"model": "tiny"}, 400, "missing_required_parameter"),
        ({"model": "other", "messages": [GOOD_MESSAGE]}, 404, "model_not_found"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": [image_part(b"not an image at all")]}]},
            400,
            "invalid_image",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": [image_part(png_bytes()[:60])]}]},
            400,
            "invalid_image",
        ),
        (
            {
                "model": "tiny",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
                    }
                ],
            },
            400,
            "invalid_image_url",
        ),
        ({"model": "tiny", "messages": [GOOD_MESSAGE], "max_tokens": 100_000}, 400, "context_length_exceeded"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context_length_exceeded"),
        ({"model": "tiny", "messages": [GOOD_MESSAGE, {"role": "assistant", "content": "Hi"}]}, 400, "invalid_value"),
        ({"model": "tiny", "messages": [GOOD_MESSAGE], "temperature": "hot"}, 400, "invalid_value"),
    ],
)
async def test_bad_requests_get_openai_style_errors(
    served: ServeProcess, body: dict[str, object], status: int, code: str
) -> None:
    got, answer = served.request("POST", "/v3/chat/completions", body, headers=AUTH)
    assert got == status
    error = answer["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]


async def test_body_that_is_not_json_gets_400(served: ServeProcess) -> None:
    status, answer = served.request("POST", "/v3/chat/completions", b"{not json", headers=AUTH)
    assert status == 400
    assert "JSON" in answer["error"]["message"]


async def test_the_api_key_is_required_and_never_logged(served: ServeProcess) -> None:
    body = {"model": "tiny", "messages": [GOOD_MESSAGE], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, answer = served.request("POST", "/v3/chat/completions", body, headers=headers)
        assert status == 401
        assert answer["error"]["code"] == "invalid_api_key"
    status, _ = served.request("GET", "/v1/models")
    assert status == 401
    status, answer = served.request("POST", "/v3/chat/completions", body, headers=AUTH)
    assert status == 200 and answer["choices"][0]["message"]["content"]
    assert served.health()["status"] == "ok"  # the health check needs no key
    assert API_KEY not in served.log()


async def test_a_client_that_disconnects_stops_its_generation(served: ServeProcess) -> None:
    before = served.health()
    body = {
        "model": "tiny", "messages": [GOOD_MESSAGE], "max_tokens": 1500, "ignore_eos": True, "stream": True,
        "temperature": 0.0,
    }  # fmt: skip
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{served.base_url}/chat/completions", json=body, headers=AUTH)
        received = 0
        while received < 3:  # the role chunk, then text
            line = await response.content.readline()
            if line.startswith(b"data: "):
                assert "error" not in json.loads(line[6:])
                received += 1
        assert served.health()["active"] == 1
        response.close()  # hang up mid-answer

    cancelled = before.get("cancelled", 0)
    after = await served.wait_health(lambda h: h["active"] == 0 and h.get("cancelled", 0) > cancelled)
    generated = after.get("tokens", 0) - before.get("tokens", 0)
    assert 0 < generated < 1500, "the engine stopped long before the 1500 tokens it was asked for"
    assert "the client went away" in served.log()

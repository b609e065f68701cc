"""A real ``llava-bot serve`` process with the tiny model, and the same engine in this process to compare."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot.engine.base import Engine
from bot.engine.manager import load_engine
from tests.conftest import F32
from tests.e2e.serve_process import ServeProcess

API_KEY = "test-key-that-must-not-be-logged"
# The engine `llava-bot serve` runs by default; f32 makes its greedy tokens exact and comparable.
KIND = "genai-batching"


@pytest.fixture(scope="session")
def served(tiny_llava: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """``llava-bot serve`` on the tiny FP16 folder, f32 inference, API key required."""
    server = ServeProcess(tiny_llava[1] / "FP16", tmp_path_factory.mktemp("serve"), ov_config=F32, api_key=API_KEY)
    with server:
        yield server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def in_process(tiny_llava: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    """The same engine on the same folder in this process: the answers the server must give."""
    config = {"CACHE_DIR": str(tmp_path_factory.mktemp("ov-cache")), **F32}
    engine = await asyncio.to_thread(load_engine, KIND, tiny_llava[1] / "FP16", "CPU", config)
    yield engine
    await asyncio.to_thread(engine.close)

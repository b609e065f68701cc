"""Serving with the genai engines never imports PyTorch or transformers: they cost seconds at every start and
hundreds of MB, and a serving-only install does not have them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, sample_image

HEAVY = ("torch", "transformers", "optimum")


def imported(stderr: str) -> list[str]:
    """Module names from Python's import-time profile (``PYTHONPROFILEIMPORTTIME``), one per import."""
    return [
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    ]


def heavy_imports(stderr: str) -> list[str]:
    return sorted({name for name in imported(stderr) if name.split(".")[0] in HEAVY})


@pytest.mark.parametrize("engine", ["genai", "genai-batching"])
def test_chat_answers_without_importing_pytorch(tiny_llava: tuple[Path, Path], tmp_path: Path, engine: str) -> None:
    image = tmp_path / "picture.png"
    sample_image().save(image)
    # The profile is switched on through the environment, so the batching engine's own process reports too.
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--model", str(tiny_llava[1] / "INT4"), "--engine", engine,
         "--image", str(image), "--max-new-tokens", "6", "What is in this picture?"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[6 tokens" in result.stderr, "the model did not answer"
    names = imported(result.stderr)
    # The profile really covers the engine: its modules appear (in both processes for the batching engine).
    processes = 2 if engine == "genai-batching" else 1
    assert names.count("bot.engine.template") == processes
    assert names.count("openvino_genai") == processes
    assert heavy_imports(result.stderr) == []


def test_the_optimum_engine_still_loads_the_reference_stack(tiny_llava: tuple[Path, Path]) -> None:
    """The check above can fail: the reference engine does import transformers and torch."""
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--model", str(tiny_llava[1] / "INT4"), "--engine", "optimum",
         "--max-new-tokens", "2", "Hello"],
        cwd=ROOT, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"torch", "transformers"} <= set(heavy_imports(result.stderr))

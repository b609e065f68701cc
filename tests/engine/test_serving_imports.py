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


def test_the_check_sees_a_heavy_import() -> None:
    """The check above can fail: a process that imports transformers shows it (and torch, which it needs)."""
    result = subprocess.run(
        [sys.executable, "-c", "import transformers"],
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers" in heavy_imports(result.stderr)


def test_an_interactive_chat_attaches_an_image_and_follows_up(tiny_llava: tuple[Path, Path], tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    sample_image().save(image)
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--model", str(tiny_llava[1] / "INT4"), "--engine", "genai",
         "--max-new-tokens", "5"],
        input=f"/image {image}\nWhat is this?\nAnd the colour?\n/quit\n",
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # One answer per question, each on its own line; the image is acknowledged once.
    assert len([line for line in result.stdout.splitlines() if line.strip()]) == 2
    assert result.stderr.count("image attached") == 1
    assert result.stderr.count("[5 tokens") == 2


def without_conversion_packages(*args: str) -> subprocess.CompletedProcess[str]:
    """``llava-bot ARGS`` in an interpreter where the conversion packages cannot be imported, as in a
    serving-only install (a ``None`` entry in ``sys.modules`` is how Python marks a module as absent)."""
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'optimum', 'optimum.intel', 'nncf'):\n"
        "    sys.modules[name] = None\n"
        "from bot.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def test_convert_without_the_conversion_packages_says_how_to_install_them(
    tiny_llava: tuple[Path, Path], tmp_path: Path
) -> None:
    result = without_conversion_packages("convert", str(tiny_llava[0]), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "pip install 'llava-bot[convert]'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_optimum_engine_without_the_conversion_packages_says_how_to_install_them(
    tiny_llava: tuple[Path, Path],
) -> None:
    result = without_conversion_packages(
        "chat", "--model", str(tiny_llava[1] / "INT4"), "--engine", "optimum", "--max-new-tokens", "2", "Hello"
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "optimum engine" in result.stderr and "pip install 'llava-bot[convert]'" in result.stderr


def test_genai_chat_works_without_the_conversion_packages(tiny_llava: tuple[Path, Path]) -> None:
    result = without_conversion_packages(
        "chat", "--model", str(tiny_llava[1] / "INT4"), "--engine", "genai", "--max-new-tokens", "3", "Hello"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[3 tokens" in result.stderr

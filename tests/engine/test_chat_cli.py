"""`llava-bot chat --image` shows the model the file itself: its answer equals the transformers reference's."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image

from bot.engine.base import ImageRef, Turn
from tests.conftest import ROOT, sample_image
from tests.engine.test_engines import reference_text

QUESTION = "What is unusual in this picture?"
NEW_TOKENS = 24


def detailed_picture() -> Image.Image:
    """Shapes with fine grain on top: a lossy copy of it differs in many pixels."""
    picture = sample_image((160, 120), seed=1)
    grain = Image.frombytes("RGB", picture.size, random.Random(1).randbytes(160 * 120 * 3))
    return Image.blend(picture, grain, 0.25)


def chat_cli(model: Path, image: Path) -> str:
    command = [
        sys.executable, "-m", "bot", "chat", "--model", str(model), "--engine", "genai",
        "--ov-config", "INFERENCE_PRECISION_HINT=f32", "--max-new-tokens", str(NEW_TOKENS),
        "--image", str(image), QUESTION,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_chat_cli_answer_to_a_png_equals_the_reference(tiny_llava: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, out = tiny_llava
    path = tmp_path / "photo.png"
    detailed_picture().save(path, "PNG")

    with Image.open(path) as sent:
        expected = reference_text(checkpoint, [Turn("user", QUESTION, (ImageRef.from_image(sent),))], NEW_TOKENS)
    assert expected.strip(), "the reference produced no text; the fixture model is unusable"
    assert chat_cli(out / "FP16", path) == expected + "\n"

    # The comparison can tell: the same picture after a JPEG round trip (what the model used to see)
    # gets another answer from the reference.
    buffer = io.BytesIO()
    with Image.open(path) as sent:
        sent.save(buffer, "JPEG", quality=92, subsampling=0)
    with Image.open(buffer) as recompressed:
        seen = ImageRef.from_image(recompressed)
        assert reference_text(checkpoint, [Turn("user", QUESTION, (seen,))], NEW_TOKENS) != expected


def test_a_bad_batching_flag_gets_one_line_naming_it(tiny_llava: tuple[Path, Path]) -> None:
    folder = str(tiny_llava[1] / "INT4")
    for command, flag, message in [
        (["serve", "--model", folder, "--concurrency", "0"], "--concurrency", "must be between 1 and 64"),
        (["chat", "--model", folder, "--max-batched-tokens", "4", "hi"], "--max-batched-tokens", "at least 16"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "bot", *command], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
        )
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and flag in done.stderr and message in done.stderr, done.stderr

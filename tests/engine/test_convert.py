"""`llava-bot convert`: idempotent, interrupt-safe, and clear about what went wrong."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.cli import main
from bot.engine import variants
from bot.engine.base import EngineError
from bot.engine.manager import load_engine
from tests.conftest import ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot", *args], capture_output=True, text=True, cwd=ROOT, check=False)


def test_converted_folders_are_complete_for_both_engines(tiny_llava: tuple[Path, Path]) -> None:
    out = tiny_llava[1]
    assert variants.available(out) == ["INT4", "INT8", "FP16"]
    for precision in variants.PRECISIONS:
        folder = out / precision
        for name in ("openvino_tokenizer.xml", "openvino_detokenizer.xml", "preprocessor_config.json"):
            assert (folder / name).is_file(), f"{precision} lacks {name}"
        manifest = json.loads((folder / variants.MANIFEST).read_text())
        assert manifest["precision"] == precision
    int4 = json.loads((out / "INT4" / variants.MANIFEST).read_text())
    assert (int4["mode"], int4["group_size"], int4["ratio"], int4["all_layers"]) == ("INT4_ASYM", 128, 1.0, True)
    assert json.loads((out / "INT8" / variants.MANIFEST).read_text())["mode"] == "INT8_ASYM"


def test_conversion_is_idempotent(tiny_llava: tuple[Path, Path]) -> None:
    checkpoint, out = tiny_llava
    before = {p: (out / p / variants.MANIFEST).stat().st_mtime_ns for p in variants.PRECISIONS}
    result = run_cli("convert", str(checkpoint), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("already converted") == 3
    assert {p: (out / p / variants.MANIFEST).stat().st_mtime_ns for p in variants.PRECISIONS} == before


def test_interrupted_conversion_leaves_nothing_loadable_but_broken(
    tiny_llava: tuple[Path, Path], tmp_path: Path
) -> None:
    checkpoint, converted = tiny_llava
    out = tmp_path / "out"
    # FP16 is done (the long export, here taken from the cached model); the INT8 step is killed part-way.
    shutil.copytree(converted / "FP16", out / "FP16")
    command = [sys.executable, "-m", "bot", "convert", str(checkpoint), "--out", str(out), "--precision", "int8"]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # Kill the whole process group once the INT8 folder is being written.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any((out / ".INT8.partial").glob("*.xml")):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert any((out / ".INT8.partial").iterdir()), "killed before it wrote anything; the test proves nothing"
    assert variants.available(out) == ["FP16"]
    with pytest.raises(EngineError):
        load_engine("genai", out / ".INT8.partial")
    # The next run starts the step again and finishes it.
    result = run_cli("convert", str(checkpoint), "--out", str(out), "--precision", "int8")
    assert result.returncode == 0, result.stderr
    assert variants.available(out) == ["INT8", "FP16"]
    assert not list(out.glob(".*.partial"))
    # A truncated file inside an otherwise complete folder is noticed too.
    weights = out / "INT8" / "openvino_language_model.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    assert variants.available(out) == ["FP16"]
    with pytest.raises(EngineError, match="incomplete or damaged"):
        load_engine("genai", out / "INT8")


def test_unknown_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "no-such-org/no-such-model", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "Could not load model 'no-such-org/no-such-model'" in err


def test_non_llava_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=1).save_pretrained(tmp_path / "llama")
    assert main(["convert", str(tmp_path / "llama"), "--out", str(tmp_path / "x")]) == 1
    assert "not an image-text-to-text LLaVA-family model" in capsys.readouterr().err


def test_unwritable_output_is_refused(
    tiny_llava: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["convert", str(tiny_llava[0]), "--out", str(blocker / "out")]) == 1
    assert "Cannot write to" in capsys.readouterr().err


def test_not_enough_disk_is_refused(
    tiny_llava: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    assert main(["convert", str(tiny_llava[0]), "--out", str(tmp_path / "out")]) == 1
    assert "Not enough disk space" in capsys.readouterr().err
    assert variants.available(tmp_path / "out") == []


def test_chat_answers_on_stdout_only(tiny_llava: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.conftest import sample_image

    image = tmp_path / "photo.png"
    sample_image().save(image)
    args = ["chat", "--model", str(tiny_llava[1] / "INT4"), "--image", str(image), "--max-new-tokens", "12"]
    result = run_cli(*args, "What is this?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no answer on stdout"
    assert "tokens" in result.stderr and "tokens" not in result.stdout


def test_chat_error_paths(tiny_llava: tuple[Path, Path], tmp_path: Path) -> None:
    missing = run_cli("chat", "--model", str(tmp_path / "models" / "INT4"), "hi")
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr and "llava-bot convert" in missing.stderr
    assert missing.stdout == ""

    parent = run_cli("chat", "--model", str(tiny_llava[1]), "hi")
    assert parent.returncode == 1 and "pass one of them" in parent.stderr

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    bad_image = run_cli("chat", "--model", str(tiny_llava[1] / "INT4"), "--image", str(broken), "hi")
    assert bad_image.returncode == 1 and "broken.jpg" in bad_image.stderr
    assert len(bad_image.stderr.strip().splitlines()) == 1

    no_file = run_cli("chat", "--model", str(tiny_llava[1] / "INT4"), "--image", str(tmp_path / "nope.png"), "hi")
    assert no_file.returncode == 1 and "Cannot read image" in no_file.stderr

"""KEY=VALUE words of ``--ov-config``: one parser for the CLI and the benchmark, refusing what it can't use."""

from __future__ import annotations

import pytest

from bot.cli import main
from bot.engine.ov_config import BadPair, parse_pairs


def test_pairs_become_properties() -> None:
    pairs = ["INFERENCE_PRECISION_HINT=f32", " NUM_STREAMS = 2 ", "CACHE_DIR="]
    assert parse_pairs(pairs) == {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": "2", "CACHE_DIR": ""}


def test_a_value_may_hold_equals_signs() -> None:
    assert parse_pairs(["CACHE_DIR=/srv/a=b"]) == {"CACHE_DIR": "/srv/a=b"}


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("NUM_STREAMS", "expected KEY=VALUE, got 'NUM_STREAMS'"),
        ("=f32", "the key is empty in '=f32'"),
        ("  =f32", "the key is empty in '  =f32'"),
        ("NUM STREAMS=2", "a key has no spaces, got 'NUM STREAMS'"),
    ],
)
def test_bad_pairs_are_refused_with_a_reason(pair: str, message: str) -> None:
    with pytest.raises(BadPair) as refused:
        parse_pairs(["CACHE_DIR=x", pair])
    assert str(refused.value) == message


def test_a_key_given_twice_is_refused_rather_than_guessed() -> None:
    with pytest.raises(BadPair) as refused:
        parse_pairs(["NUM_STREAMS=1", "NUM_STREAMS=2"])
    assert str(refused.value) == "NUM_STREAMS is given twice ('1', then '2'); give it once"


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_the_cli_names_the_bad_pair_before_anything_else(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The folder is missing too; the cheap check of the command line comes before the slow ones.
    assert main([command, "--model", "/nonexistent/INT4", "--ov-config", "NUM_STREAMS"]) == 1
    assert capsys.readouterr().err.strip() == f"llava-bot {command}: --ov-config: expected KEY=VALUE, got 'NUM_STREAMS'"

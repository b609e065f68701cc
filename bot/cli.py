"""The ``llava-bot`` command line: run the bot, convert models, chat in a terminal, manage the database."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bot.engine import variants
from bot.engine.base import BatchingOptions
from bot.engine.convert import DEFAULT_MODEL
from bot.engine.manager import local_engines
from bot.engine.ov_config import BadPair, parse_pairs

log = logging.getLogger("bot")

EXIT_USAGE = 2


class CliError(Exception):
    """Ends the command with one line on stderr and a non-zero exit code."""


def _ov_config(pairs: Sequence[str]) -> dict[str, str]:
    try:
        return parse_pairs(pairs)
    except BadPair as error:
        raise CliError(f"--ov-config: {error}") from error


def _add_batching_flags(parser: argparse.ArgumentParser, *, concurrency: bool) -> None:
    defaults = BatchingOptions()
    group = parser.add_argument_group("genai-batching engine (as the model.* keys of config.toml)")
    group.add_argument("--kv-cache-gb", type=int, default=defaults.kv_cache_gb, help="KV cache in GB (0: automatic)")
    group.add_argument(
        "--max-batched-tokens", type=int, default=defaults.max_batched_tokens, help="most tokens one step computes"
    )
    group.add_argument(
        "--image-cache-size", type=int, default=defaults.image_cache_size, help="encoded images kept for follow-ups"
    )
    if concurrency:
        group.add_argument("--concurrency", type=int, default=defaults.concurrency, help="answers decoded together")


def _batching(args: argparse.Namespace) -> BatchingOptions:
    """The batching options of the command line; a bad one ends the command naming its flag."""
    options = BatchingOptions(
        args.kv_cache_gb,
        args.max_batched_tokens,
        args.image_cache_size,
        getattr(args, "concurrency", BatchingOptions.concurrency),
    )
    problem = options.problem()
    if problem is not None:
        raise CliError(f"--{problem[0].replace('_', '-')} {problem[1]}")
    return options


def default_model_dir(model: str) -> Path:
    """Where ``convert`` puts a model by default: ``models/<last part of the id>``."""
    return Path("models") / Path(model.rstrip("/")).name


def _convert_hint(folder: Path) -> str:
    return f"llava-bot convert {DEFAULT_MODEL} --out {folder.parent if folder.name in variants.PRECISIONS else folder}"


# --- convert -------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a LLaVA checkpoint to OpenVINO IR and compress it to INT8 and INT4."""
    from bot.engine.convert import ConversionError, convert
    from bot.engine.extras import convert_extra_missing

    problem = convert_extra_missing("Converting a model")
    if problem:
        raise CliError(problem)

    out = Path(args.out) if args.out else default_model_dir(args.model)
    try:
        precisions = [variants.normalise_precision(p) for p in args.precision]
    except ValueError as error:
        raise CliError(str(error)) from error
    try:
        outcome = convert(args.model, out, precisions, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except ConversionError as error:
        raise CliError(str(error)) from error
    except KeyboardInterrupt:
        print("Interrupted; nothing half-converted was left behind.", file=sys.stderr)
        return 130
    for precision, what in outcome.items():
        print(f"{precision}: {what} -> {out / precision}", file=sys.stderr)
    return 0


# --- chat ----------------------------------------------------------------------------------------
def _load_image(path: str) -> object:
    """The image file at ``path``, checked and normalised as the bot does with an upload."""
    from bot.chat.images import ImageLimits, ImageRejected, load_image

    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CliError(f"Cannot read image {path}: {error.strerror or error}") from error
    try:
        return load_image(data, ImageLimits())
    except ImageRejected as error:
        raise CliError(f"{path}: {error}") from error


async def _answer(engine: object, conversation: list, settings: object) -> str:
    from bot.engine.base import Engine, GenerationSettings

    assert isinstance(engine, Engine) and isinstance(settings, GenerationSettings)
    stream = engine.generate(conversation, settings)
    pieces = []
    async for piece in stream:
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    stats = stream.stats
    rate = stats.decode_tokens_per_second
    ttft = stats.time_to_first_token
    print(
        f"[{stats.new_tokens} tokens"
        + (f", first after {ttft:.2f} s" if ttft is not None else "")
        + (f", {rate:.1f} tokens/s" if rate else "")
        + "]",
        file=sys.stderr,
    )
    return "".join(pieces)


INTERACTIVE_HELP = (
    "Type a question and press Enter. Commands: /image PATH attaches an image to your next question, "
    "/reset starts over, /quit leaves."
)


async def _chat(args: argparse.Namespace) -> int:
    from bot.engine.base import EngineError, GenerationSettings, Turn
    from bot.engine.manager import load_engine

    ov_config = _ov_config(args.ov_config)
    folder = Path(args.model)
    if not variants.is_complete(folder):
        raise CliError(f"{variants.describe_missing(folder)}. To create it, run: {_convert_hint(folder)}")
    images = [_load_image(p) for p in args.image]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    batching, ov_config = _batching(args), _ov_config(args.ov_config)
    started = time.monotonic()
    try:
        engine = await asyncio.to_thread(load_engine, args.engine, folder, args.device, ov_config, batching)
    except EngineError as error:
        raise CliError(str(error)) from error
    except RuntimeError as error:  # OpenVINO reports unknown devices and bad properties this way
        raise CliError(f"Cannot load {folder} on {args.device}: {str(error).splitlines()[0]}") from error
    print(f"[{args.engine} engine, {folder.name}, loaded in {time.monotonic() - started:.1f} s]", file=sys.stderr)
    try:
        if args.question:
            turn = Turn("user", args.question, tuple(images))  # type: ignore[arg-type]
            await _answer(engine, [turn], settings)
            return 0
        return await _interactive(engine, images, settings)
    finally:
        engine.close()


async def _interactive(engine: object, images: list, settings: object) -> int:
    from bot.engine.base import Turn

    print(INTERACTIVE_HELP, file=sys.stderr)
    conversation: list[Turn] = []
    pending = list(images)
    while True:
        print("you> ", end="", file=sys.stderr, flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in {"/quit", "/exit"}:
            return 0
        if line == "/reset":
            conversation.clear()
            pending.clear()
            print("[conversation cleared]", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line.removeprefix("/image").strip()
            try:
                pending.append(_load_image(path))
            except CliError as error:
                print(error, file=sys.stderr)
                continue
            print(f"[image attached to your next question: {path}]", file=sys.stderr)
            continue
        conversation.append(Turn("user", line, tuple(pending)))
        pending.clear()
        answer = await _answer(engine, conversation, settings)
        conversation.append(Turn("assistant", answer))


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a converted model in the terminal; the answer streams to stdout."""
    return asyncio.run(_chat(args))


# --- serve ---------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve one precision folder over the OpenAI-compatible API (/v3 and /v1) for bots on other hosts."""
    import os

    from bot.engine.base import EngineError
    from bot.serve.app import default_name, serve

    ov_config = _ov_config(args.ov_config)
    folder = Path(args.model)
    if not variants.is_complete(folder):
        raise CliError(f"{variants.describe_missing(folder)}. To create it, run: {_convert_hint(folder)}")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "").strip()
        if not api_key:
            raise CliError(f"--api-key-env names {args.api_key_env}, but that environment variable is empty")
    try:
        asyncio.run(
            serve(
                folder,
                name=args.name or default_name(folder),
                host=args.host,
                port=args.port,
                kind=args.engine,
                device=args.device,
                ov_config=ov_config,
                api_key=api_key,
                batching=_batching(args),
            )
        )
    except EngineError as error:
        raise CliError(str(error)) from error
    except OSError as error:  # the port is taken, or the host is not an address of this machine
        raise CliError(f"Cannot listen on {args.host}:{args.port}: {error.strerror or error}") from error
    except RuntimeError as error:  # OpenVINO reports unknown devices and bad properties this way
        raise CliError(f"Cannot load {folder} on {args.device}: {str(error).splitlines()[0]}") from error
    return 0


# --- run / db ----------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """Start the Discord bot."""
    from bot.config import ConfigError, load_config

    try:
        config = load_config(Path(args.config))
    except ConfigError as error:
        raise CliError(str(error)) from error
    # Imported once the configuration is known to be good: a mistake in it is told without waiting for them.
    import discord

    from bot.client import run_bot
    from bot.services import StartupError

    try:
        return run_bot(config)
    except StartupError as error:
        raise CliError(str(error)) from error
    except discord.LoginFailure as error:
        raise CliError(
            "Discord refused the bot token; check DISCORD_TOKEN (Developer Portal > Bot > Token)."
        ) from error


def cmd_db(args: argparse.Namespace) -> int:
    """Apply database migrations (``upgrade``) or show the current revision (``current``)."""
    from bot.config import ConfigError, load_config
    from bot.store.db import current_revision, upgrade_sync

    try:
        config = load_config(Path(args.config), require_token=False)
    except ConfigError as error:
        raise CliError(str(error)) from error
    if args.action == "upgrade":
        upgrade_sync(config.database.url, args.revision)
    print(asyncio.run(current_revision(config.database.url)) or "(empty database)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="llava-bot", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help=cmd_run.__doc__, description=cmd_run.__doc__)
    run.add_argument("--config", default="config.toml", help="configuration file (default: config.toml)")
    run.set_defaults(func=cmd_run)

    convert = sub.add_parser("convert", help=cmd_convert.__doc__, description=cmd_convert.__doc__)
    convert.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"HF id or local folder ({DEFAULT_MODEL})")
    convert.add_argument("--out", help="output folder (default: models/<model name>)")
    convert.add_argument(
        "--precision", nargs="+", default=list(variants.PRECISIONS), metavar="P",
        help="any of int4 int8 fp16 (default: all three)",
    )  # fmt: skip
    convert.set_defaults(func=cmd_convert)

    chat = sub.add_parser("chat", help=cmd_chat.__doc__, description=cmd_chat.__doc__)
    chat.add_argument("--model", required=True, help="one precision folder, e.g. models/llava-1.5-7b-hf/INT4")
    chat.add_argument("--engine", choices=local_engines(), default="genai")
    chat.add_argument("--device", default="CPU", help="CPU, GPU or AUTO (default: CPU)")
    chat.add_argument("--image", action="append", default=[], help="image for the (first) question; repeatable")
    chat.add_argument("--ov-config", action="append", default=[], metavar="KEY=VALUE", help="OpenVINO property")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("question", nargs="?", help="ask once and exit; without it, chat interactively")
    _add_batching_flags(chat, concurrency=False)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    serve.add_argument("--model", required=True, help="one precision folder, e.g. models/llava-1.5-7b-hf/INT4")
    serve.add_argument("--name", help="model name clients ask for (default: e.g. llava-1.5-7b-hf-int4)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--engine", choices=local_engines(), default="genai-batching")
    serve.add_argument("--device", default="CPU", help="CPU, GPU or AUTO (default: CPU)")
    serve.add_argument("--ov-config", action="append", default=[], metavar="KEY=VALUE", help="OpenVINO property")
    serve.add_argument("--api-key-env", metavar="VAR", help="require the key held by this environment variable")
    _add_batching_flags(serve, concurrency=True)
    serve.set_defaults(func=cmd_serve)

    db = sub.add_parser("db", help=cmd_db.__doc__, description=cmd_db.__doc__)
    db.add_argument("action", choices=("upgrade", "current"))
    db.add_argument("--revision", default="head")
    db.add_argument("--config", default="config.toml")
    db.set_defaults(func=cmd_db)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llava-bot`` and ``python -m bot``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The terminal chat keeps stderr for its own short status lines; long-running commands log progress.
    quiet = args.command in {"chat", "db"}
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except CliError as error:
        print(f"llava-bot {args.command}: {error}", file=sys.stderr)
        return 1

"""Typed settings read from a TOML file; the Discord token comes from the environment or that file.

``config.example.toml`` documents every key with its default; the dataclasses below are the source
of truth it mirrors (a test checks the two agree).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.chat.ratelimit import parse_rate_limit
from bot.engine.base import BatchingOptions
from bot.engine.manager import ENGINES, REMOTE_KIND
from bot.engine.variants import PRECISIONS

DISCORD_TOKEN_ENV = "DISCORD_TOKEN"


class ConfigError(ValueError):
    """The configuration can't be used; ``str()`` names the key and the fix."""


@dataclass
class DiscordConfig:
    # Prefer the DISCORD_TOKEN environment variable: a token in a file is easier to leak.
    token: str = ""
    # REST base URL, for operators behind a REST proxy; empty means Discord's own.
    api_base_url: str = ""
    # Gateway websocket URL; empty means Discord's own.
    gateway_url: str = ""
    answer_dms: bool = True
    # User ids allowed to run /precision besides the application's owner(s).
    admin_ids: list[int] = field(default_factory=list)
    # Who may /reset a channel: "everyone", "moderators" (Manage Messages) or "admins".
    reset_permission: str = "everyone"
    # Seconds between edits of a streaming reply (Discord rate-limits edits per channel).
    edit_interval: float = 1.0
    # Register slash commands in these servers (instant), in addition to globally.
    command_guild_ids: list[int] = field(default_factory=list)
    # Ask for the privileged Message Content intent (it must also be switched on in the Developer Portal).
    # Only with it does Discord show the bot the images of messages that don't mention it, which a
    # question replying to someone else's picture needs.
    message_content_intent: bool = False
    # Who may ask (mentions and /ask). An empty allow list admits everyone; a deny list always wins.
    # A thread counts as its parent channel too; in DMs only the user lists apply.
    allowed_guild_ids: list[int] = field(default_factory=list)
    denied_guild_ids: list[int] = field(default_factory=list)
    allowed_channel_ids: list[int] = field(default_factory=list)
    denied_channel_ids: list[int] = field(default_factory=list)
    allowed_role_ids: list[int] = field(default_factory=list)
    denied_role_ids: list[int] = field(default_factory=list)
    allowed_user_ids: list[int] = field(default_factory=list)
    denied_user_ids: list[int] = field(default_factory=list)
    # Seconds that answers still being written get to finish after SIGTERM/SIGINT before they are cut short.
    shutdown_grace: float = 20.0
    # Seconds between looks for replies that ended processes sharing the database left unfinished.
    recovery_interval: float = 10.0
    # Gateway shards of the whole bot; 0 means one unsharded connection.
    shard_count: int = 0
    # The shards this process runs; empty means all of shard_count.
    shard_ids: list[int] = field(default_factory=list)


@dataclass
class ModelConfig:
    # Folder holding the FP16 / INT8 / INT4 variants made by `llava-bot convert`.
    dir: str = "models/llava-1.5-7b-hf"
    # What to convert on first start when auto_convert is on.
    source: str = "llava-hf/llava-1.5-7b-hf"
    auto_convert: bool = False
    precision: str = "INT4"
    engine: str = "genai-batching"
    device: str = "CPU"
    # OpenVINO properties, e.g. {CACHE_DIR = "data/ov-cache"}.
    ov_config: dict[str, str] = field(default_factory=lambda: {"CACHE_DIR": "data/ov-cache"})
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    # Seconds an answer may go without a new token before the engine is restarted (the watchdog).
    stall_timeout: float = 120.0
    # engine = "openai": the OpenAI-compatible server, e.g. "http://127.0.0.1:8000/v3" (OVMS, llava-bot serve).
    base_url: str = ""
    # The name of the environment variable holding the server's API key (empty: no key).
    api_key_env: str = ""
    # The model name the server knows; remote_models maps precisions to names for /precision.
    remote_model: str = ""
    remote_models: dict[str, str] = field(default_factory=dict)
    # Seconds to wait for the server to connect or to send the next part of an answer.
    request_timeout: float = 60.0
    # Context window in tokens when neither a local tokenizer nor the server tells it.
    context_window: int = 4096
    # engine = "genai-batching": KV cache in GB (0: sized automatically, ~32k tokens, at most 1/4 of the memory).
    kv_cache_gb: int = BatchingOptions.kv_cache_gb
    # engine = "genai-batching": the most tokens one step computes (a new image is prefilled in such chunks).
    max_batched_tokens: int = BatchingOptions.max_batched_tokens
    # engine = "genai-batching": encoded images kept for follow-ups (LLaVA-1.5).
    image_cache_size: int = BatchingOptions.image_cache_size
    # engine = "genai-batching": answers decoded together; further questions wait their turn.
    concurrency: int = BatchingOptions.concurrency

    def batching(self) -> BatchingOptions:
        """The batching engine's options from these keys."""
        return BatchingOptions(self.kv_cache_gb, self.max_batched_tokens, self.image_cache_size, self.concurrency)


@dataclass
class ChatConfig:
    # Requests waiting beyond this many get a polite "busy" answer.
    max_queue: int = 16
    max_image_bytes: int = 10 * 1024 * 1024
    # Guards against decompression bombs: width * height.
    max_image_pixels: int = 40_000_000
    # Stored turns considered when building a prompt (the context window trims further).
    history_turns: int = 40
    # Delete stored turns and images older than this many days (0 = keep them until /reset or /forget).
    retention_days: int = 0
    # Questions per person: "COUNT/PERIOD" with a unit s, m, h or d (e.g. "10/10m"), or "off".
    rate_limit: str = "10/10m"


@dataclass
class DatabaseConfig:
    # Any SQLAlchemy async URL; the default is a SQLite file under data/.
    url: str = "sqlite+aiosqlite:///data/llava-bot.sqlite3"


@dataclass
class LoggingConfig:
    level: str = "INFO"


@dataclass
class Config:
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _check_type(where: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list")
        return [_check_type(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table")
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(annotation, types.UnionType):
        raise TypeError(annotation)  # not used by any key
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, str) and value.isdigit():
        return int(value)  # Discord ids are often quoted to survive tools that read them as floats
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(known))})")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"[{name}] must be a table")
            values[name] = _build(hint, value, f"{name}.")  # type: ignore[arg-type]
        else:
            values[name] = _check_type(f"{where}{name}", value, hint)
    return cls(**values)


def _validate(config: Config) -> None:
    model = config.model
    model.precision = model.precision.upper()
    if model.precision not in PRECISIONS:
        raise ConfigError(f"model.precision must be one of {', '.join(PRECISIONS)}, got {model.precision!r}")
    if model.engine not in ENGINES:
        raise ConfigError(f"model.engine must be one of {', '.join(ENGINES)}, got {model.engine!r}")
    _validate_remote(model)
    if model.max_new_tokens < 1:
        raise ConfigError("model.max_new_tokens must be at least 1")
    if not 0.0 <= model.temperature <= 5.0 or not 0.0 < model.top_p <= 1.0:
        raise ConfigError("model.temperature must be in [0, 5] and model.top_p in (0, 1]")
    if model.stall_timeout <= 0:
        raise ConfigError("model.stall_timeout must be more than 0 seconds")
    problem = model.batching().problem()
    if problem is not None:
        raise ConfigError(f"model.{problem[0]} {problem[1]}")
    if config.discord.reset_permission not in ("everyone", "moderators", "admins"):
        raise ConfigError("discord.reset_permission must be 'everyone', 'moderators' or 'admins'")
    if config.discord.edit_interval < 0.2:
        raise ConfigError("discord.edit_interval must be at least 0.2 seconds")
    if config.discord.shutdown_grace < 0:
        raise ConfigError("discord.shutdown_grace must be 0 or more seconds")
    if config.discord.recovery_interval <= 0:
        raise ConfigError("discord.recovery_interval must be more than 0 seconds")
    _validate_shards(config.discord)
    if config.chat.max_queue < 1 or config.chat.max_image_bytes < 1 or config.chat.max_image_pixels < 1:
        raise ConfigError("chat.max_queue, chat.max_image_bytes and chat.max_image_pixels must be positive")
    if config.chat.history_turns < 1:
        raise ConfigError("chat.history_turns must be at least 1")
    if config.chat.retention_days < 0:
        raise ConfigError("chat.retention_days must be a number of days, or 0 to keep everything")
    try:
        parse_rate_limit(config.chat.rate_limit)
    except ValueError as error:
        raise ConfigError(f"chat.rate_limit: {error}") from error


def _validate_remote(model: ModelConfig) -> None:
    model.remote_models = {key.upper(): value for key, value in model.remote_models.items()}
    unknown = sorted(set(model.remote_models) - set(PRECISIONS))
    if unknown:
        raise ConfigError(f"model.remote_models keys must be {', '.join(PRECISIONS)}, got {unknown[0]!r}")
    if model.request_timeout <= 0 or model.context_window < 256:
        raise ConfigError("model.request_timeout must be positive and model.context_window at least 256")
    if model.engine != REMOTE_KIND:
        return
    if not model.base_url.startswith(("http://", "https://")):
        raise ConfigError('model.engine = "openai" needs model.base_url, e.g. "http://127.0.0.1:8000/v3"')
    if not model.remote_model and not model.remote_models:
        raise ConfigError('model.engine = "openai" needs model.remote_model (the model name the server knows)')
    if model.remote_models and model.precision not in model.remote_models:
        raise ConfigError(f"model.remote_models has no name for model.precision {model.precision}")


def _validate_shards(discord: DiscordConfig) -> None:
    count, ids = discord.shard_count, discord.shard_ids
    if count < 0:
        raise ConfigError("discord.shard_count must be 0 (no sharding) or a positive number of shards")
    if ids and count == 0:
        raise ConfigError("discord.shard_ids needs discord.shard_count: the total number of shards of the bot")
    outside = [i for i in ids if not 0 <= i < count]
    if outside:
        raise ConfigError(f"discord.shard_ids must lie in 0..{count - 1} (shard_count = {count}), got {outside[0]}")
    if len(set(ids)) != len(ids):
        raise ConfigError("discord.shard_ids lists a shard twice")


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document; raises ConfigError naming the first bad key."""
    config: Config = _build(Config, data, "")
    _validate(config)
    return config


def load_config(path: Path, *, require_token: bool = True) -> Config:
    """Read ``path`` (a missing file means all defaults) and take the token from the environment."""
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from error
    elif path.name != "config.toml":
        raise ConfigError(f"configuration file {path} does not exist")
    config = parse_config(data)
    token = os.environ.get(DISCORD_TOKEN_ENV, "").strip()
    if token:
        config.discord.token = token
    if require_token and not config.discord.token:
        raise ConfigError(
            f"no Discord bot token: set the {DISCORD_TOKEN_ENV} environment variable (or discord.token in {path})"
        )
    return config

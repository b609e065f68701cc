"""The real ``llava-bot run`` as a child process, pointed at a loopback Discord emulator.

Fault tests need the bot as an operator runs it: its own process (to send it real signals), the
engine's real worker process (to kill or stop it), a real config file and a real SQLite file.

    async with BotProcess(emulator, model_dir, tmp_path, config={"model": {"engine": "genai-batching"}}) as bot:
        ...  # bot.pid, bot.worker_pids(), bot.signal(signal.SIGTERM), await bot.wait_exit(), bot.log()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.conftest import ROOT
from tests.e2e.discord_emulator import DiscordEmulator


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, tables: dict[str, dict[str, Any]]) -> None:
    """Write ``{"discord": {...}, "model": {...}}`` as a TOML file (inline tables for nested dicts)."""
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))


def bot_config_tables(emulator: DiscordEmulator, model_dir: Path, data_dir: Path) -> dict[str, dict[str, Any]]:
    """A config for the real bot: the emulator's URLs, the tiny model, a fresh SQLite file and cache."""
    return {
        "discord": {
            "api_base_url": emulator.api_base,
            "gateway_url": emulator.gateway_url,
            "edit_interval": 0.2,
        },
        "model": {
            "dir": str(model_dir),
            "precision": "INT4",
            "max_new_tokens": 24,
            "ov_config": {"CACHE_DIR": str(data_dir / "ov-cache")},
        },
        "database": {"url": f"sqlite+aiosqlite:///{data_dir / 'bot.sqlite3'}"},
    }


class BotProcess:
    """``python -m bot run --config FILE`` with the emulator's token, its output collected for assertions.

    With ``model.engine = "scripted"`` it answers with the scripted engine (tests/support/run.py).

    ``config`` is merged table by table over :func:`bot_config_tables`. Entering waits until the bot has
    connected to the gateway and registered its commands; leaving sends SIGINT (then SIGKILL if it hangs).
    """

    def __init__(
        self,
        emulator: DiscordEmulator,
        model_dir: Path,
        data_dir: Path,
        config: dict[str, dict[str, Any]] | None = None,
        *,
        env: dict[str, str] | None = None,
    ) -> None:
        self.emulator = emulator
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.tables = bot_config_tables(emulator, model_dir, data_dir)
        self.config_path = data_dir / "config.toml"
        self.configure(config or {})
        # The scripted engine is registered by a wrapper around the same command line.
        self.module = "tests.support.run" if self.tables["model"].get("engine") == "scripted" else "bot"
        self.env = {**os.environ, "DISCORD_TOKEN": emulator.token, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.process: asyncio.subprocess.Process | None = None
        self._stderr = bytearray()
        self._reader: asyncio.Task[None] | None = None

    def configure(self, config: dict[str, dict[str, Any]]) -> None:
        """Merge ``config`` into the config file, table by table; the next :meth:`start` reads it, as a restart does."""
        for table, values in config.items():
            self.tables.setdefault(table, {}).update(values)
        write_config(self.config_path, self.tables)

    @property
    def database_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.data_dir / 'bot.sqlite3'}"

    async def start(self, *, ready_timeout: float = 180.0) -> None:
        """Start the process and wait until it is connected and has synced its slash commands."""
        self.emulator.commands.clear()
        identified = self.emulator.identify_count
        await self.launch()

        def ready() -> bool | None:
            if self.process is not None and self.process.returncode is not None:
                raise AssertionError(f"llava-bot run exited with {self.process.returncode}:\n{self.log()}")
            return (self.emulator.identify_count > identified and bool(self.emulator.commands.get(None))) or None

        await self.emulator.wait_for(ready, ready_timeout)

    async def launch(self) -> None:
        """Start the process without waiting for it to connect."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module, "run", "--config", str(self.config_path),
            cwd=ROOT, env=self.env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self._stderr += chunk

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        """Everything the bot wrote to stderr so far (its log)."""
        return self._stderr.decode(errors="replace")

    def worker_pids(self) -> list[int]:
        """Process ids of the bot's child processes (the batching engine's worker)."""
        # A child belongs to the thread that started it (the engine is loaded on a worker thread): read all.
        pids: list[int] = []
        for children in Path(f"/proc/{self.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in children.read_text().split()]
        return sorted(pids)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float = 90.0) -> int:  # noqa: ASYNC109
        """Wait for the process to end and return its exit status (negative: killed by that signal)."""
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)
        return code

    async def stop(self) -> int:
        """SIGINT, as Ctrl+C would; SIGKILL if it does not exit within a minute."""
        if self.process is None:
            return 0
        if self.process.returncode is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGINT)
        try:
            return await self.wait_exit(60)
        except TimeoutError:
            self.process.kill()
            return await self.wait_exit(10)

    async def __aenter__(self) -> BotProcess:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        workers = self.worker_pids()
        await self.stop()
        for pid in workers:
            # A worker left behind (the test killed the parent) must not outlive the test.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

"""The real ``llava-bot serve`` as a child process on a free loopback port.

with ServeProcess(model_folder, tmp_path, ov_config=F32) as server:
    server.base_url      # http://127.0.0.1:PORT/v3
    server.health()      # the /health counters
    server.kill(); server.start()   # a crash, then a restart on the same port
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.conftest import ROOT


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServeProcess:
    """``python -m bot serve --model FOLDER --port PORT ...`` with its log in ``data_dir/serve.log``."""

    def __init__(
        self,
        model: Path,
        data_dir: Path,
        *,
        name: str = "tiny",
        engine: str = "genai-batching",
        ov_config: dict[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.model = model
        self.name = name
        self.port = free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "serve.log"
        config = {"CACHE_DIR": str(data_dir / "ov-cache"), **(ov_config or {})}
        self.args = [
            sys.executable, "-m", "bot", "serve", "--model", str(model), "--name", name,
            "--port", str(self.port), "--engine", engine,
            *(arg for key, value in config.items() for arg in ("--ov-config", f"{key}={value}")),
        ]  # fmt: skip
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if api_key is not None:
            self.env["LLAVA_TEST_SERVE_KEY"] = api_key
            self.args += ["--api-key-env", "LLAVA_TEST_SERVE_KEY"]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v3"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 240.0) -> None:
        """Start the process (appending to its log) and wait until ``/health`` answers."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.args, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"llava-bot serve exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                self.health()
                return
            time.sleep(0.3)
        raise AssertionError(f"llava-bot serve did not become ready:\n{self.log()}")

    def health(self) -> dict[str, Any]:
        """The ``/health`` document (raises OSError while the server is down)."""
        with urllib.request.urlopen(f"{self.root_url}/health", timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data

    def request(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One plain HTTP request; returns (status, parsed JSON body), error statuses included."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(
            f"{self.root_url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    async def wait_health(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:  # noqa: ASYNC109
        """Poll ``/health`` until ``predicate`` holds for it; returns that document."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if predicate(health):
                return health
            await asyncio.sleep(0.1)
        raise AssertionError(f"/health never satisfied the condition; last: {self.health()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def workers(self) -> list[int]:
        """Process ids of the server's children (the batching engine's worker)."""
        if self.process is None:
            return []
        try:
            return [
                int(p) for p in Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            ]
        except OSError:
            return []

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the server and its worker, as a crash of the host would end them."""
        workers = self.workers()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if the server does not exit within a minute."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        workers = self.workers()
        self.process.terminate()
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait(10)
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> ServeProcess:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

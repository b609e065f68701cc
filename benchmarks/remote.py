"""Going remote: the bot through a real ``llava-bot serve`` on loopback, against the bot with its engine in-process.

The server runs the default engine on the same precision folder as the in-process bot, so the two differ only by
the HTTP hop (the request with its base64 picture, server-sent events back, the remote engine's bookkeeping).
Each round alternates three arms, each a fresh ``benchmarks.whole_bot`` process with one warm-up question and
one measured one: the in-process bot, one bot through the server, and two bot processes through the server
asking at the same moment. A quick run takes its in-process arm from the bot row, measured the same way.
The ratios come from the arms of the same round (see :mod:`benchmarks.pairing`). The server's own CPU time is
the benchmark's, not a neighbour's, in each run's background-load figure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from benchmarks.machine import ForeignLoad
from benchmarks.pairing import Arm, PairedRun, paired_ratio, schedule
from benchmarks.runner import WorkerError, run_module, worker_env
from benchmarks.schema import RemoteResult
from benchmarks.workload import Timing, decode_union_rate, median

if TYPE_CHECKING:
    from benchmarks.runner import Runner

log = logging.getLogger(__name__)

REMOTE = "openai"
TWO_BOTS = "openai, 2 bots"
MODEL_NAME = "bench"
# A 7B model on a slow disk takes minutes to load and compile.
_SERVER_READY_S = 900.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _process_cpu_seconds(pid: int) -> float:
    """User + system time of ``pid`` and of its children it has waited for; 0 once it is gone."""
    try:
        # The command name may hold spaces: the numbers start after its closing parenthesis.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class ServeProcess:
    """``python -m bot serve`` on a free loopback port, until the ``with`` block ends."""

    def __init__(self, folder: Path, *, engine: str, device: str, ov_config: dict[str, str], log_path: Path) -> None:
        self.port = _free_port()
        self.log_path = log_path
        self.args = [
            sys.executable, "-m", "bot", "serve", "--model", str(folder), "--name", MODEL_NAME,
            "--port", str(self.port), "--engine", engine, "--device", device,
            *(arg for key, value in ov_config.items() for arg in ("--ov-config", f"{key}={value}")),
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v3"

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` document (raises OSError while it is not up)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data

    def cpu_seconds(self) -> float:
        """CPU time of the server and its live children (the batching engine's worker)."""
        if self.process is None:
            return 0.0
        pid = self.process.pid
        try:
            children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            children = []
        return sum(_process_cpu_seconds(p) for p in [pid, *children])

    def __enter__(self) -> ServeProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as sink:
            sink.write(f"$ {' '.join(self.args)}\n".encode())
            sink.flush()
            self.process = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=worker_env()
            )
        deadline = time.monotonic() + _SERVER_READY_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise WorkerError(f"llava-bot serve exited with {self.process.returncode} (log: {self.log_path})")
            with contextlib.suppress(OSError):
                self.health()
                return self
            time.sleep(0.3)
        self._stop()
        raise WorkerError(f"llava-bot serve was not up after {_SERVER_READY_S:.0f} s (log: {self.log_path})")

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class LoadBesides(ForeignLoad):
    """Background load that counts the server's CPU time as the benchmark's own, like its measuring processes."""

    def __init__(self, server: ServeProcess) -> None:
        self._server = server
        super().__init__()

    def _own_seconds(self) -> float:  # type: ignore[override]
        return ForeignLoad._own_seconds() + self._server.cpu_seconds()


def run_together(arg_lists: Sequence[Sequence[str]], log_path: Path, timeout: float) -> list[dict[str, Any]]:
    """Run several ``benchmarks.whole_bot`` processes whose measured questions start at the same moment.

    Each process warms up, touches its ready file and waits; once all are ready the go file appears.
    """
    with tempfile.TemporaryDirectory(prefix="llava-bench-together-") as scratch, log_path.open("ab") as sink:
        go = Path(scratch) / "go"
        readies = [Path(scratch) / f"ready-{i}" for i in range(len(arg_lists))]
        results = [Path(scratch) / f"result-{i}.json" for i in range(len(arg_lists))]
        processes = []
        for args, ready, result in zip(arg_lists, readies, results, strict=True):
            command = [sys.executable, "-m", "benchmarks.whole_bot", *args]
            command += ["--ready-file", str(ready), "--go-file", str(go), "--result", str(result)]
            sink.write(f"$ {' '.join(command)}\n".encode())
            sink.flush()
            processes.append(subprocess.Popen(command, stdout=sink, stderr=sink, env=worker_env()))
        deadline = time.monotonic() + timeout
        try:
            while not all(r.exists() for r in readies):
                if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
                    raise WorkerError(f"a bot process ended or hung before its measured question (log: {log_path})")
                time.sleep(0.05)
            go.touch()
            for process in processes:
                process.wait(max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired as error:
            raise WorkerError(f"the bots took over {timeout:.0f} s (log: {log_path})") from error
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        failed = [p.returncode for p in processes if p.returncode != 0]
        if failed or not all(r.exists() for r in results):
            raise WorkerError(f"a bot process failed with exit code {failed[:1]} (log: {log_path})")
        return [json.loads(r.read_text()) for r in results]


def aggregate_rate(results: Sequence[dict[str, Any]]) -> float | None:
    """Tokens of every measured answer of these bot processes over the time at least one was decoding."""
    timings = [
        Timing(first, first, finished, tokens, 0, "")
        for result in results
        for first, finished, tokens in result.get("samples", {}).get("decode_spans", [])
        if first is not None and finished is not None
    ]
    return decode_union_rate(timings)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _record(run: PairedRun, results: Sequence[dict[str, Any]]) -> None:
    run.mention_to_first_text_s = median([r.get("mention_to_first_text_s") for r in results])
    run.decode_tokens_per_s = aggregate_rate(results)


def _reusable_bot_row(runner: Runner) -> tuple[dict[str, Any], float | None] | None:
    """The bot row of a quick run, which is the in-process arm's measurement: the same process arguments, one
    measured question, taken just before the server started. A smoke run need not start that process twice."""
    if runner.options.quick and runner.options.runs == 1:
        return runner.bot_measurement
    return None


def measure_remote(runner: Runner, folder: Path, precision: str, scratch: Path) -> RemoteResult:
    """The remote rows of the report: ``runner.options.pairs`` rounds (at least one; one when quick) of the arms."""
    options, engine = runner.options, runner.default_engine
    # Four bot processes per round: a smoke run keeps to one.
    rounds = 1 if options.quick else max(options.pairs, 1)
    result = RemoteResult(status="measured", precision=precision, engine=engine, rounds=rounds)
    local, remote, two = Arm(engine, precision), Arm(REMOTE, precision), Arm(TWO_BOTS, precision)
    log_path = runner.logs / "remote.log"
    reused = _reusable_bot_row(runner)
    serve_config = {**options.ov_config, "CACHE_DIR": str(scratch / "cache-serve")}
    log.info("measuring the bot through llava-bot serve (%s on %s), %d round(s)", engine, precision, rounds)
    try:
        with ServeProcess(
            folder / precision, engine=engine, device=options.device, ov_config=serve_config,
            log_path=runner.logs / "serve.log",
        ) as server:  # fmt: skip
            for round_, arm in schedule([local, remote, two], rounds):
                bot = runner.bot_args(folder, engine, precision, 1, scratch / f"cache-remote-{arm.engine}")
                through = [*bot, "--base-url", server.base_url, "--remote-model", MODEL_NAME]
                run = PairedRun(round=round_, engine=arm.engine, precision=precision)
                load = LoadBesides(server)
                try:
                    if arm is local and reused is not None:
                        _record(run, [reused[0]])
                    elif arm is local:
                        _record(run, [run_module("benchmarks.whole_bot", bot, log_path, options.worker_timeout_s)])
                    elif arm is remote:
                        _record(run, [run_module("benchmarks.whole_bot", through, log_path, options.worker_timeout_s)])
                    else:
                        _record(run, run_together([through, through], log_path, options.worker_timeout_s))
                except (WorkerError, KeyError, TypeError) as error:
                    log.error("round %d of %s failed: %s", round_ + 1, arm.engine, error)
                    run.error = str(error)
                run.foreign_cpu_share = reused[1] if arm is local and reused is not None else load.share()
                result.runs.append(run)
                log.info(
                    "round %d, %s: first text after %s s, %s tok/s",
                    round_ + 1, arm.engine, _fmt(run.mention_to_first_text_s), _fmt(run.decode_tokens_per_s),
                )  # fmt: skip
    except WorkerError as error:
        log.error("the measurement through llava-bot serve failed: %s", error)
        return RemoteResult(status="failed", reason=str(error), precision=precision, engine=engine)
    _summarise(result, local, remote, two, options.load_gap_limit)
    return result


def _summarise(result: RemoteResult, local: Arm, remote: Arm, two: Arm, load_limit: float) -> None:
    def medians(arm: Arm, quantity: str) -> float | None:
        return median([getattr(r, quantity) for r in result.runs if r.engine == arm.engine])

    result.in_process_first_text_s = medians(local, "mention_to_first_text_s")
    result.remote_first_text_s = medians(remote, "mention_to_first_text_s")
    result.in_process_tokens_per_s = medians(local, "decode_tokens_per_s")
    result.remote_tokens_per_s = medians(remote, "decode_tokens_per_s")
    result.two_bots_tokens_per_s = medians(two, "decode_tokens_per_s")
    result.first_text_ratio = paired_ratio(result.runs, remote, local, "mention_to_first_text_s", load_limit)
    result.decode_ratio = paired_ratio(result.runs, remote, local, "decode_tokens_per_s", load_limit)
    result.two_bots_ratio = paired_ratio(result.runs, two, remote, "decode_tokens_per_s", load_limit)
    failed = [r.error for r in result.runs if r.error]
    if failed and len(failed) == len(result.runs):
        result.status, result.reason = "failed", failed[0]

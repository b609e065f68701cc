"""Run the whole benchmark: prepare the model, measure every engine and precision, compare, report."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.machine import ForeignLoad, describe_machine, measure_bandwidth
from benchmarks.model import BenchModelError, check_model_dir, describe_model
from benchmarks.options import BenchOptions
from benchmarks.pairing import Arm, PairedRun, paired_ratios, schedule
from benchmarks.schema import (
    BenchResults,
    BotResult,
    ConcurrencyResult,
    EngineResult,
    ModelInfo,
    RemoteResult,
    Settings,
)
from benchmarks.summary import apply_bandwidth, best_bandwidth, concurrency_result, fill_engine_result
from benchmarks.targets import compute_targets, load_baseline
from bot.engine.manager import engine_class, local_engines

log = logging.getLogger(__name__)


class BenchError(RuntimeError):
    """The benchmark cannot run at all; ``str()`` says why."""


class WorkerError(RuntimeError):
    """One measuring process failed; the benchmark records it and goes on."""


def default_engine() -> str:
    """The engine a freshly configured bot uses: the benchmark's headline numbers are about it."""
    from bot.config import ModelConfig

    return ModelConfig().engine


def known_engines() -> list[str]:
    """Every engine ``load_engine`` runs in this process: the registry's names but the remote engine."""
    return local_engines()


# The source checkout holding this package (and the tests' Discord emulator that the bot row needs).
CHECKOUT = Path(__file__).resolve().parents[1]


def worker_env() -> dict[str, str]:
    """The environment of every measuring process: offline, logging, and this checkout importable."""
    env = dict(os.environ)
    # The benchmark never downloads anything; a slow or absent network must not stall a measurement.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("LLAVA_BOT_BENCH_LOG", "INFO")
    # The measuring processes import this package from the checkout, wherever the bench was started.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH", "")]))
    return env


def run_module(module: str, args: Sequence[str], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run ``python -m module args --result FILE`` in a fresh process and return the JSON it wrote.

    The process's stdout and stderr are appended to ``log_path``, which the error names when it fails.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as scratch:
        result = Path(scratch) / "result.json"
        command = [sys.executable, "-m", module, *args, "--result", str(result)]
        with log_path.open("ab") as sink:
            sink.write(f"$ {' '.join(command)}\n".encode())
            sink.flush()
            try:
                done = subprocess.run(command, stdout=sink, stderr=sink, env=worker_env(), timeout=timeout, check=False)
            except subprocess.TimeoutExpired as error:
                raise WorkerError(
                    f"{module} {' '.join(args[:4])} took over {timeout:.0f} s (log: {log_path})"
                ) from error
        if done.returncode != 0 or not result.exists():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise WorkerError(f"exit code {done.returncode}: {tail[0][:300]} (log: {log_path})")
        data: dict[str, Any] = json.loads(result.read_text())
        return data


class Runner:
    """One benchmark run; :meth:`run` returns the results."""

    def __init__(self, options: BenchOptions) -> None:
        self.options = options
        self.logs = options.out / "logs"
        self.default_engine = default_engine()
        known = known_engines()
        engines = options.engines or known
        unknown = [e for e in engines if e not in known]
        if unknown:
            raise BenchError(f"unknown engine {unknown[0]!r}; load_engine knows {', '.join(known)}")
        # The default engine first: it is the one the targets are about.
        self.engines = sorted(engines, key=lambda e: (e != self.default_engine, known.index(e)))
        wanted = options.concurrency_engines
        if wanted is None:
            # Batching engines exist to serve several conversations at once, so they are always timed doing it.
            wanted = [self.default_engine] + [e for e in known if engine_class(e).max_concurrency > 1]
        self.concurrency_engines = [e for e in dict.fromkeys(wanted) if e in self.engines and options.channels]
        # The bot row's raw result and the background load meanwhile: a quick run's remote rows reuse it.
        self.bot_measurement: tuple[dict[str, Any], float | None] | None = None

    # --- the model -------------------------------------------------------------------------------
    def prepare_model(self) -> tuple[Path, list[str], ModelInfo]:
        """The folder of precisions to measure, the precisions found there, and its description."""
        options = self.options
        if options.model is not None:
            try:
                precisions = check_model_dir(options.model, options.precisions)
            except BenchModelError as error:
                raise BenchError(str(error)) from error
            return options.model, precisions, describe_model(options.model, precisions, synthetic=False)
        log.info("preparing the synthetic benchmark model in %s", options.work_dir)
        started = time.monotonic()
        try:
            prepared = run_module(
                "benchmarks.model",
                ["--work-dir", str(options.work_dir), "--spec", options.model_spec],
                self.logs / "model.log",
                3600.0,
            )
        except WorkerError as error:
            raise BenchError(f"could not build and convert the benchmark model: {error}") from error
        folder = Path(prepared["folder"])
        log.info("benchmark model ready in %.0f s", time.monotonic() - started)
        info = describe_model(folder, options.precisions, synthetic=True, spec_name=options.model_spec)
        return folder, list(options.precisions), info

    # --- one engine on one precision -----------------------------------------------------------------
    def _worker_args(self, engine: str, folder: Path, cache: Path) -> list[str]:
        args = ["--engine", engine, "--folder", str(folder), "--cache-dir", str(cache), "--device", self.options.device]
        for key, value in self.options.ov_config.items():
            args += ["--ov-config", f"{key}={value}"]
        return args

    def measure_engine(
        self, engine: str, precision: str, folder: Path, concurrency: bool, scratch: Path
    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
        """Cold starts, warm starts and one measuring process, each fresh: (measured, colds, warms)."""
        options = self.options
        colds: list[dict[str, Any]] = []
        warms: list[dict[str, Any]] = []
        measured: dict[str, Any] = {}
        log_path = self.logs / f"{engine}-{precision}.log"
        for index in range(options.load_runs):
            # A new, empty compiled-model cache for every cold start; the warm start after it reuses it.
            cache = scratch / f"cache-{engine}-{precision}-{index}"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            base = self._worker_args(engine, folder, cache)
            timeout = options.worker_timeout_s
            cold = run_module("benchmarks.worker", base, log_path, timeout)
            colds.append(cold)
            if index == 0:
                extra = [
                    "--measure",
                    f"--runs={options.runs}",
                    f"--new-tokens={options.new_tokens}",
                    f"--follow-up-tokens={options.follow_up_tokens}",
                ]
                if concurrency:
                    extra += ["--channels", *map(str, options.channels)]
                    extra += [
                        f"--concurrency-runs={options.runs}",
                        f"--concurrency-tokens={options.concurrency_tokens}",
                    ]
                measured = run_module("benchmarks.worker", base + extra, log_path, timeout)
                warms.append(measured)
            else:
                warms.append(run_module("benchmarks.worker", base, log_path, timeout))
            if not any(cache.iterdir()):
                log.warning("%s on %s wrote nothing to its CACHE_DIR: warm starts cannot be faster", engine, precision)
            shutil.rmtree(cache, ignore_errors=True)
            log.info(
                "%s %s: cold start %.2f s, warm start %.2f s", engine, precision, cold["load_s"], warms[-1]["load_s"]
            )
        return measured, colds, warms

    # --- the whole run ---------------------------------------------------------------------------------
    def run(self) -> BenchResults:
        """Measure everything the options ask for."""
        options = self.options
        started = time.monotonic()
        date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        options.out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.logs, ignore_errors=True)
        if "CACHE_DIR" in options.ov_config:
            log.warning("ignoring --ov-config CACHE_DIR: the benchmark manages the cache to time cold and warm starts")
            options.ov_config.pop("CACHE_DIR")
        machine = describe_machine()
        foreign = ForeignLoad()
        folder, precisions, model = self.prepare_model()
        results = BenchResults(
            date=date,
            machine=machine,
            model=model,
            settings=Settings(
                runs=options.runs,
                load_runs=options.load_runs,
                new_tokens=options.new_tokens,
                follow_up_tokens=options.follow_up_tokens,
                concurrency_tokens=options.concurrency_tokens,
                channels=list(options.channels),
                engines=self.engines,
                precisions=precisions,
                default_engine=self.default_engine,
                device=options.device,
                ov_config=dict(options.ov_config),
                quick=options.quick,
                pairs=options.pairs,
                model_spec=None if options.model is not None else options.model_spec,
            ),
        )
        # Measured while nothing else runs: the engines' worker processes would compete for memory.
        results.bandwidth = measure_bandwidth(options.bandwidth_mib)
        concurrency_precision = "INT4" if "INT4" in precisions else precisions[0]
        with tempfile.TemporaryDirectory(prefix="llava-bench-cache-", dir=options.out) as scratch:
            for engine in self.engines:
                for precision in precisions:
                    concurrent = engine in self.concurrency_engines and precision == concurrency_precision
                    log.info("measuring %s on %s (%.0f s so far)", engine, precision, time.monotonic() - started)
                    result = EngineResult(engine=engine, precision=precision)
                    row_load = ForeignLoad()
                    try:
                        measured, colds, warms = self.measure_engine(
                            engine, precision, folder / precision, concurrent, Path(scratch)
                        )
                    except WorkerError as error:
                        log.error("%s on %s failed: %s", engine, precision, error)
                        result.error = str(error)
                        results.engines.append(result)
                        if concurrent:
                            results.concurrency.append(
                                ConcurrencyResult(engine, precision, options.concurrency_tokens, error=str(error))
                            )
                        continue
                    result.foreign_cpu_share = row_load.share()
                    fill_engine_result(
                        result,
                        measured=measured,
                        colds=colds,
                        warms=warms,
                        model=model,
                    )
                    results.engines.append(result)
                    if concurrent:
                        results.concurrency.append(concurrency_result(engine, precision, options, measured))
            if options.pairs:
                self.measure_paired(results, folder, Path(scratch))
            if options.bot:
                results.bot = self.measure_bot(folder, concurrency_precision, results, Path(scratch))
            else:
                results.bot = BotResult(status="unavailable", reason="skipped (--no-bot)")
            if options.bot and options.remote:
                results.remote = self.measure_remote(folder, concurrency_precision, Path(scratch))
            else:
                skipped = "--no-bot" if not options.bot else "--no-remote"
                results.remote = RemoteResult(status="unavailable", reason=f"skipped ({skipped})")
        if not options.quick:
            # Measured again at the end and the better kept: a neighbour on a shared host can slow one measurement.
            # A smoke run keeps its one sample, like every other figure of it.
            results.bandwidth = best_bandwidth(results.bandwidth, measure_bandwidth(options.bandwidth_mib))
        apply_bandwidth(results)
        results.targets = compute_targets(results, load_baseline(options.baseline))
        results.wall_time_s = time.monotonic() - started
        machine.foreign_cpu_share = foreign.share()
        if machine.foreign_cpu_share is not None and machine.foreign_cpu_share > 0.05:
            log.warning(
                "other processes used %.0f%% of the CPU during the benchmark: its numbers are lower than this "
                "machine can do",
                machine.foreign_cpu_share * 100,
            )
        return results

    # --- paired runs ------------------------------------------------------------------------------------
    def paired_arms(self, precisions: list[str]) -> list[Arm]:
        """Every engine on every precision, engines of one precision next to each other."""
        return [Arm(engine, precision) for precision in precisions for engine in self.engines]

    def measure_paired(self, results: BenchResults, folder: Path, scratch: Path) -> None:
        """Alternate the engines and precisions run by run; record each run and the ratios of neighbours."""
        options = self.options
        arms = self.paired_arms(results.settings.precisions)
        log.info("paired runs: %d round(s) of %s", options.pairs, ", ".join(a.label for a in arms))
        for round_, arm in schedule(arms, options.pairs):
            # One cache per arm, kept between rounds: after the first round every run starts warm, as a bot does.
            cache = scratch / f"paired-{arm.engine}-{arm.precision}"
            cache.mkdir(parents=True, exist_ok=True)
            args = self._worker_args(arm.engine, folder / arm.precision, cache)
            args += ["--measure", "--runs=1", f"--new-tokens={options.new_tokens}", "--follow-up-tokens=1"]
            run = PairedRun(round=round_, engine=arm.engine, precision=arm.precision)
            load = ForeignLoad()
            try:
                data = run_module("benchmarks.worker", args, self.logs / "paired.log", options.worker_timeout_s)
                first = data["runs"][0]["new_image"]
                run.decode_tokens_per_s = first["decode_tokens_per_s"]
                run.ttft_new_image_s = first["ttft_s"]
            except (WorkerError, KeyError, IndexError) as error:
                log.error("paired run %d of %s failed: %s", round_ + 1, arm.label, error)
                run.error = str(error)
            run.foreign_cpu_share = load.share()
            results.paired.append(run)
            log.info(
                "round %d, %s: %s tok/s, other processes %s",
                round_ + 1,
                arm.label,
                "failed" if run.decode_tokens_per_s is None else f"{run.decode_tokens_per_s:.1f}",
                "unknown" if run.foreign_cpu_share is None else f"{run.foreign_cpu_share * 100:.0f}%",
            )
        results.paired_ratios = paired_ratios(results.paired, arms, self.default_engine, options.load_gap_limit)

    def measure_bot(self, folder: Path, precision: str, results: BenchResults, scratch: Path) -> BotResult:
        """The whole bot through the loopback Discord emulator, in a process of its own."""
        from benchmarks.whole_bot import bot_unavailable_reason

        reason = bot_unavailable_reason()
        if reason is not None:
            log.info("not measuring through the bot: %s", reason)
            return BotResult(status="unavailable", reason=reason)
        engine = self.default_engine
        raw = results.engine(engine, precision)
        args = self.bot_args(folder, engine, precision, self.options.runs, scratch / "cache-bot")
        log.info("measuring %s on %s through the bot and the loopback Discord emulator", engine, precision)
        load = ForeignLoad()
        try:
            data = run_module("benchmarks.whole_bot", args, self.logs / "bot.log", self.options.worker_timeout_s)
        except WorkerError as error:
            log.error("the measurement through the bot failed: %s", error)
            return BotResult(status="failed", reason=str(error), engine=engine, precision=precision)
        self.bot_measurement = (data, load.share())
        result = BotResult(**data)
        if raw is not None and raw.decode_tokens_per_s:
            result.engine_tokens_per_s = raw.decode_tokens_per_s
            if result.bot_tokens_per_s:
                result.overhead_ratio = result.bot_tokens_per_s / raw.decode_tokens_per_s
        return result

    def bot_args(self, folder: Path, engine: str, precision: str, runs: int, cache: Path) -> list[str]:
        """The arguments of a ``benchmarks.whole_bot`` process asking ``runs`` measured questions."""
        args = [
            "--model-dir", str(folder),
            "--engine", engine,
            "--precision", precision,
            "--runs", str(runs),
            "--new-tokens", str(self.options.new_tokens),
            "--cache-dir", str(cache),
            "--device", self.options.device,
        ]  # fmt: skip
        for key, value in self.options.ov_config.items():
            args += ["--ov-config", f"{key}={value}"]
        return args

    def measure_remote(self, folder: Path, precision: str, scratch: Path) -> RemoteResult:
        """The bot through ``llava-bot serve`` against the in-process bot, and two bots on one server."""
        from benchmarks.remote import measure_remote
        from benchmarks.whole_bot import bot_unavailable_reason

        reason = bot_unavailable_reason()
        if reason is not None:
            return RemoteResult(status="unavailable", reason=reason)
        return measure_remote(self, folder, precision, scratch)


def run_bench(options: BenchOptions) -> tuple[BenchResults, str]:
    """Run the benchmark and write its reports; returns the results and the Markdown report."""
    from benchmarks.report import write_reports

    results = Runner(options).run()
    markdown = write_reports(results, options.out)
    return results, markdown

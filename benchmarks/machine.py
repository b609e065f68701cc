"""The computer a benchmark ran on, and how fast one core, and all cores together, read memory."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import multiprocessing
import os
import platform
import queue
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.schema import Bandwidth, Machine

log = logging.getLogger(__name__)

_VERSIONED = ("openvino", "openvino-genai", "optimum-intel", "transformers", "numpy")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _ram_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return None


def _usable_cores() -> int:
    # A container or taskset may allow fewer cores than the machine has; inference uses only those.
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe_machine() -> Machine:
    """CPU model, cores, memory, system and the versions of the inference stack."""
    versions: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    ram = _ram_bytes()
    load: list[float] | None = None
    with contextlib.suppress(AttributeError, OSError):
        load = [round(v, 2) for v in os.getloadavg()]
    return Machine(
        cpu_model=_cpu_model(),
        logical_cpus=os.cpu_count() or 1,
        usable_cpus=_usable_cores(),
        ram_gib=None if ram is None else round(ram / 2**30, 1),
        system=f"{platform.system()} {platform.release()} {platform.machine()}",
        python=platform.python_version(),
        versions=versions,
        load_average=load,
    )


class ForeignLoad:
    """How much CPU other processes used while the benchmark ran (Linux only).

    Two cores shared with a test-suite or a build give numbers that say little about the engines; the report
    says so when it happened. Busy time of the whole machine comes from ``/proc/stat``; this process and the
    measuring processes it started and waited for are subtracted.
    """

    def __init__(self) -> None:
        self._start = self._busy_seconds()
        self._own_start = self._own_seconds()
        self._started = time.monotonic()

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy.
        values = [int(v) for v in fields[:8]]
        busy = sum(values) - values[3] - values[4]
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def share(self) -> float | None:
        """Other processes' CPU time as a share of all cores' time since this object was made."""
        now = self._busy_seconds()
        if now is None or self._start is None:
            return None
        elapsed = (time.monotonic() - self._started) * _usable_cores()
        foreign = (now - self._start) - (self._own_seconds() - self._own_start)
        return max(0.0, foreign / elapsed) if elapsed > 0 else None


def measure_bandwidth(size_mib: int = 512, repeats: int = 5) -> Bandwidth:
    """Single-thread memory read bandwidth: the best of ``repeats`` sums over a ``size_mib`` array.

    numpy's sum of float64 runs on one thread and is a plain sequential read, so its speed is what one core
    gets from memory; the array is far larger than any cache so that it is memory, not cache, that is read.
    The best run is kept because interference (another process, a page fault) only ever makes a run slower.
    """
    count = size_mib * 2**20 // 8
    data = np.ones(count, dtype=np.float64)  # written once so every page is really there before timing
    nbytes = data.nbytes
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        elapsed = time.perf_counter() - started
        samples.append(nbytes / elapsed / 1e9)
    del data
    best = max(samples)
    log.info("single-thread read bandwidth %.1f GB/s (best of %d over %d MiB)", best, repeats, size_mib)
    aggregate, aggregate_samples, readers = measure_aggregate_bandwidth(size_mib, repeats)
    return Bandwidth(
        gb_per_s=best,
        samples_gb_per_s=samples,
        array_mib=size_mib,
        method="numpy float64 sum, one thread, best run",
        aggregate_gb_per_s=aggregate,
        aggregate_samples_gb_per_s=aggregate_samples,
        readers=readers,
    )


def _reader(size_mib: int, repeats: int, barrier: Any, results: Any) -> None:
    """One of the simultaneous readers: after each barrier, time one sum over its own array."""
    data = np.ones(size_mib * 2**20 // 8, dtype=np.float64)
    spans = []
    for _ in range(repeats):
        barrier.wait()
        # CLOCK_MONOTONIC is one clock for every process, so the parent can line the readers' spans up.
        started = time.monotonic()
        data.sum()
        spans.append((started, time.monotonic()))
    results.put((data.nbytes, spans))


def aggregate_rates(reader_spans: list[tuple[int, list[tuple[float, float]]]]) -> list[float]:
    """GB/s of every round: all readers' bytes over the time from the first start to the last end."""
    rounds = min((len(spans) for _, spans in reader_spans), default=0)
    rates = []
    for index in range(rounds):
        first = min(spans[index][0] for _, spans in reader_spans)
        last = max(spans[index][1] for _, spans in reader_spans)
        total = sum(nbytes for nbytes, _ in reader_spans)
        if last > first:
            rates.append(total / (last - first) / 1e9)
    return rates


def measure_aggregate_bandwidth(
    size_mib: int = 512, repeats: int = 5, readers: int | None = None
) -> tuple[float | None, list[float], int]:
    """What all usable cores read together: (best GB/s, every round's GB/s, readers).

    OpenVINO runs one inference thread per core, each streaming its share of the weights, so the decode bound
    is set by what every core reads at once, which on most machines is well above one core's figure. One
    process per core (not threads: numpy's sum holds the interpreter lock) reads its own array, and the rounds
    start together behind a barrier. Returns no figure when the readers cannot be started.
    """
    count = readers or _usable_cores()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(count)
    results = context.Queue()
    processes = [context.Process(target=_reader, args=(size_mib, repeats, barrier, results)) for _ in range(count)]
    try:
        for process in processes:
            process.start()
        # Generous: each reader allocates and reads size_mib a few times, which takes seconds, not minutes.
        gathered = [results.get(timeout=300) for _ in processes]
    except (OSError, RuntimeError, queue.Empty) as error:
        log.warning("could not measure the aggregate read bandwidth with %d readers: %s", count, error)
        return None, [], count
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    rates = aggregate_rates(gathered)
    best = max(rates, default=None)
    if best is not None:
        log.info("aggregate read bandwidth %.1f GB/s with %d simultaneous readers", best, count)
    return best, rates, count

"""``python -m benchmarks``: load times, latency, throughput and memory of every engine and precision.

The pieces: :mod:`benchmarks.model` prepares the model (a synthetic LLaVA-1.5-shaped one unless a converted
folder is given), :mod:`benchmarks.worker` measures one engine and precision in a fresh process,
:mod:`benchmarks.machine` describes the computer and its memory bandwidth (one core's and all cores'),
:mod:`benchmarks.pairing` alternates engines run by run and takes ratios from neighbouring runs,
:mod:`benchmarks.whole_bot` drives the whole bot through the loopback Discord emulator,
:mod:`benchmarks.runner` puts it together, :mod:`benchmarks.targets` judges the goals and
:mod:`benchmarks.report` writes ``results.json``, ``results.md`` and ``results.png``.
"""

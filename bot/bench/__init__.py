"""``llava-bot bench``: load times, latency, throughput and memory of every engine and precision.

The pieces: :mod:`bot.bench.model` prepares the model (a synthetic LLaVA-1.5-shaped one unless a converted
folder is given), :mod:`bot.bench.worker` measures one engine and precision in a fresh process,
:mod:`bot.bench.machine` describes the computer and its memory bandwidth (one core's and all cores'),
:mod:`bot.bench.pairing` alternates engines run by run and takes ratios from neighbouring runs,
:mod:`bot.bench.whole_bot` drives the whole bot through the loopback Discord emulator,
:mod:`bot.bench.runner` puts it together, :mod:`bot.bench.targets` judges the goals and
:mod:`bot.bench.report` writes ``results.json``, ``results.md`` and ``results.png``.
"""

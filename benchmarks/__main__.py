"""``python -m benchmarks``: measure every engine and precision, then the whole bot, and print the table.

Run it from the root of a source checkout installed with ``pip install -e '.[dev]'`` (or ``.[bench]``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from benchmarks.options import add_arguments, options_from_args


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, run the benchmark and print its table; one line on stderr if it cannot run."""
    from benchmarks.runner import BenchError, run_bench

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure load time, latency, throughput and memory of every engine and precision; print the table.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        _, report = run_bench(options_from_args(args))
    except (BenchError, ValueError) as error:
        print(f"benchmarks: {error}", file=sys.stderr)
        return 1
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

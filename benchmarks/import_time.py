"""Time of ``import hf_activelr`` and its layers, side by side with ``import torch``.

    python benchmarks/import_time.py [--repeats 5]

Each statement runs in a fresh interpreter, the statements interleaved round after round (a
shared machine slows them alike); prints the median wall time of each and its ratio to
``import torch``, as a Markdown table (docs/layout.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STATEMENTS = [
    ("import torch", "the floor: every layer imports torch"),
    ("import hf_activelr.optim", "the optimizers"),
    ("import hf_activelr", "the public API; registers the Trainer names"),
    ("import transformers.trainer", "what a Trainer user imports anyway"),
    ("import hf_activelr; from hf_activelr import ActiveTrainer", "the Trainer subclass"),
]


def measure(repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {statement: [] for statement, _ in STATEMENTS}
    for _ in range(repeats):
        for statement, _ in STATEMENTS:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True)
            times[statement].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times = measure(args.repeats)
    floor = statistics.median(times["import torch"])
    print(f"| statement | median of {args.repeats} (s) | x `import torch` | what |")
    print("|---|---|---|---|")
    for statement, what in STATEMENTS:
        median = statistics.median(times[statement])
        print(f"| `{statement}` | {median:.2f} | {median / floor:.2f} | {what} |")


if __name__ == "__main__":
    main()

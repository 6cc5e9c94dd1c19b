"""Rebuild the demo pair from nothing but a Python installation, in order.

    python models/recipe/build_demo.py [--minutes 40] [--vocab-size 4096]

1. tokenizer.py     byte-level BPE on the standard library's training split -> models/demo/target/
2. train_target.py  the demo target (small Gemma 4, E2B structure)           -> models/demo/target/
3. the assistant is distilled from the target with `edgegen distill` (see models/README.md); not here.

Each step is its own script with its own options; this one runs them as subprocesses, so what it does
is exactly what running them by hand does.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--minutes", type=float, default=40.0, help="training budget of the target")
    args, train_args = parser.parse_known_args()
    steps = [
        [sys.executable, str(RECIPE / "tokenizer.py"), "--vocab-size", str(args.vocab_size)],
        [sys.executable, str(RECIPE / "train_target.py"), "--minutes", str(args.minutes), *train_args],
    ]
    for command in steps:
        print("+", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()

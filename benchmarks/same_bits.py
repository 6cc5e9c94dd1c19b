"""Whether two bundles of the same pair compute the same bits: a graph change that should not change numerics.

    python benchmarks/same_bits.py BUNDLE_A BUNDLE_B [--threads 2] [--prompt 200]

Both bundles run the same calls on the same random token ids, one bundle loaded at a time: a prompt
(last 3 positions' logits and hidden states), a 5-row verify call, a 1-row decode call and a fused draft
round. Each output is reported as bit-equal or with its largest difference; exit status 1 if any differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def outputs(path: Path, threads: int, prompt: int) -> dict[str, np.ndarray]:
    from edgegen.runtime.model import Bundle

    bundle = Bundle(path, threads=threads, hashes="never")
    ids = np.random.default_rng(0).integers(4, bundle.manifest.model.vocab_size, prompt + 6)
    cache = bundle.new_cache()
    out = {}
    out["prompt logits"], out["prompt hidden"] = bundle.target.forward(cache, ids[:prompt], logits_to_keep=3)
    out["verify logits"], hidden = bundle.target.forward(cache, ids[prompt:prompt + 5], logits_to_keep=5)
    out["verify hidden"] = hidden
    out["decode logits"], _ = bundle.target.forward(cache, ids[prompt + 5:])
    if bundle.draft_round is not None:
        tokens, logits = bundle.draft_round.run_round(cache, int(ids[-1]), hidden[-1])
        out["draft tokens"], out["draft logits"] = np.array(tokens), logits
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=200)
    args = ap.parse_args()
    a = outputs(args.a, args.threads, args.prompt)
    b = outputs(args.b, args.threads, args.prompt)
    differs = False
    for name, x in a.items():
        y = b.get(name)
        if y is not None and x.shape == y.shape and np.array_equal(x, y):
            print(f"{name:14s} bit-equal {x.shape}")
            continue
        differs = True
        detail = "missing" if y is None else ("shape " + str(y.shape) if x.shape != y.shape else
                                              f"max |diff| {np.abs(x.astype(np.float64) - y).max():.3g}")
        print(f"{name:14s} DIFFERS: {detail}")
    sys.exit(1 if differs else 0)


if __name__ == "__main__":
    main()

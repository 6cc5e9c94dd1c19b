"""Acceptance of a pair on held-out text: greedy speculation at a fixed draft length.

Prompts are windows of the demo corpus's held-out files (every 20th standard-library file, never seen in
training; see models/recipe/data.py). Each prompt is `--prompt-tokens` tokens starting at a random offset of
a held-out file; the pair then generates `--new-tokens` greedily with `--draft-tokens` drafts per round.
Prints tokens per target call (bonus token included) and acceptance by draft position.

    python benchmarks/demo_acceptance.py                        # the bundled demo pair
    python benchmarks/demo_acceptance.py --bundle DIR --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgegen.runtime.generate import Generator  # noqa: E402
from models.recipe.data import heldout_ids  # noqa: E402


def heldout_prompts(n: int, length: int, seed: int, tokenizer_path: Path | None = None) -> list[list[int]]:
    """`n` windows of `length` tokens from the held-out split, at seeded random offsets, each after <bos>."""
    ids = (heldout_ids(tokenizer_path) if tokenizer_path else heldout_ids()).astype(np.int64)
    rng = np.random.default_rng(seed)
    bos = int(ids[0])
    starts = rng.integers(1, len(ids) - length, size=n)
    return [[bos] + ids[s:s + length - 1].tolist() for s in starts]


def measure(bundle: Path, prompts: list[list[int]], new_tokens: int, k: int, threads: int | None) -> dict:
    gen = Generator(bundle, threads=threads, draft_tokens=k)
    drafted = np.zeros(k, dtype=np.int64)
    accepted = np.zeros(k, dtype=np.int64)
    emitted = calls = 0
    for ids in prompts:
        gen.reset()
        last = None
        for ev in gen.stream_ids(ids, new_tokens, use_assistant=True, draft_tokens=k):
            last = ev.stats
        emitted += last.new_tokens - 1  # the first token comes from prefill, not from a decode call
        calls += last.target_calls
        drafted[: len(last.drafted_by_position)] += last.drafted_by_position[:k]
        accepted[: len(last.accepted_by_position)] += last.accepted_by_position[:k]
    return {"bundle": str(bundle), "prompts": len(prompts), "new_tokens": new_tokens, "draft_tokens": k,
            "tokens_per_target_call": round(emitted / calls, 4),
            "acceptance_by_position": [round(float(a / d), 4) if d else None
                                       for a, d in zip(accepted, drafted, strict=True)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory [default: the demo pair, exported on first use]")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    if args.bundle is None:
        from edgegen.demo import demo_bundle

        args.bundle = demo_bundle()
    prompts = heldout_prompts(args.prompts, args.prompt_tokens, args.seed)
    result = measure(args.bundle, prompts, args.new_tokens, args.draft_tokens, args.threads)
    acc = " / ".join(f"{a:.2f}" for a in result["acceptance_by_position"] if a is not None)
    print(f"{result['prompts']} held-out prompts x {args.new_tokens} tokens, k={args.draft_tokens}: "
          f"{result['tokens_per_target_call']:.2f} tokens per target call; acceptance by position {acc}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What `--draft-tokens auto` costs against plain decoding, measured interleaved in one process.

    python benchmarks/auto_cost.py --bundle B [--threads 2] [--no-spin] [--new-tokens 48] [--rounds 8]

One Bundle is opened once; a plain Generator (draft 0) and an `auto` Generator take turns, each round
decoding the same seeded random prompt for --new-tokens tokens (EOS ignored), the order alternating every
round. Reported: ms per generated token after the first (the first comes out of the prefill) for both,
medians over rounds, their ratio (speed of auto ÷ speed of plain), tokens per target call of the auto runs,
and whether the tokens are the same. With a random-weight pair (the full-size stand-in) the drafter is
useless, so the ratio is what finding that out costs; with a trained pair it is what drafting gains.
Run-to-run noise on a shared or virtual machine is large (±10% between 48-token runs seen here); the
interleaving and the medians are what make the ratio readable.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-spin", action="store_true", help="idle threads sleep (edgegen run --no-spin)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle

    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    bundle = Bundle(args.bundle, threads=args.threads, spin=not args.no_spin, hashes="never")
    vocab = bundle.manifest.model.vocab_size
    rng = np.random.default_rng(0)
    gens = {"plain": Generator(bundle, draft_tokens=0), "auto": Generator(bundle, draft_tokens="auto")}
    ms: dict[str, list[float]] = {name: [] for name in gens}
    calls, ids = [], {name: [] for name in gens}
    for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
        prompt = [2] + [int(x) for x in rng.integers(4, vocab, args.prompt_tokens - 1)]
        for name in (("plain", "auto") if r % 2 else ("auto", "plain")):
            gen = gens[name]
            gen.eos_ids = set()
            gen.reset()
            events = list(gen.stream_ids(prompt, args.new_tokens, use_assistant=name == "auto"))
            st = events[-1].stats
            if r:
                ms[name].append(1000 * (st.elapsed_s - st.time_to_first_token_s) / (st.new_tokens - 1))
                ids[name].append([e.token_id for e in events])
                if name == "auto":
                    calls.append((st.new_tokens - 1) / max(st.target_calls - 1, 1))
    plain, auto = statistics.median(ms["plain"]), statistics.median(ms["auto"])
    print(f"{args.bundle.name}: {args.threads} threads, {'no spin' if args.no_spin else 'spin'}, "
          f"{args.rounds} rounds x {args.new_tokens} tokens, interleaved")
    print(f"  plain {plain:.2f} ms/token  samples {[round(x, 1) for x in ms['plain']]}")
    print(f"  auto  {auto:.2f} ms/token  samples {[round(x, 1) for x in ms['auto']]}")
    print(f"  auto speed / plain speed: {plain / auto:.3f}; tokens per target call (auto) "
          f"{statistics.median(calls):.2f}; tokens identical: {ids['plain'] == ids['auto']}")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()

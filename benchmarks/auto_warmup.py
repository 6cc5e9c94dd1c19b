"""What `auto` costs while it learns: the policy replayed on simulated rounds, against plain decoding.

No model runs here. Each round's cost comes from the E2B-size ratios measured by `vs_llamacpp.py --preset e2b`
and `spec_e2b.py` (a decode step = 1; verifying k drafts = 1 + slope*k, slope 0.3 from verify-5/decode-1 = 2.19;
a fused draft round = 0.05 a decode per draft), and each draft is accepted with probability p, independently.
The figure is generated tokens per decode-time, i.e. speed relative to plain decoding, averaged over seeds.
It shows how much the first measuring rounds and the probes cost over a short answer, for a drafter that is
useless (p = 0) up to one that is nearly always right; `--first-k` compares how many drafts the first round
should try.

    python benchmarks/auto_warmup.py --tokens 48 256 --first-k 1 2 4
"""

from __future__ import annotations

import argparse
import random
import statistics

from edgegen.runtime.adaptive import AutoDraft


def speed(policy: AutoDraft, p: float, tokens: int, slope: float, draft: float, seed: int) -> float:
    rng = random.Random(seed)
    elapsed, made = 0.0, 0
    while made < tokens:
        k = policy.choose(tokens - made - 1)
        accepted = 0
        while accepted < k and rng.random() < p:
            accepted += 1
        cost_draft, cost_verify = draft * k, 1.0 + slope * k
        policy.update(k, accepted, cost_draft, cost_verify)
        elapsed += cost_draft + cost_verify
        made += accepted + 1
    return made / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[48, 256])
    ap.add_argument("--accept", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9])
    ap.add_argument("--first-k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--k-max", type=int, default=4)
    ap.add_argument("--slope", type=float, default=0.3, help="verify cost per extra row, in decode steps")
    ap.add_argument("--draft", type=float, default=0.05, help="cost of one draft in a fused round, in decode steps")
    ap.add_argument("--seeds", type=int, default=200)
    args = ap.parse_args()

    base = AutoDraft(args.k_max)
    print(f"speed vs plain decoding (mean of {args.seeds} seeds); verify = 1 + {args.slope}*k, "
          f"draft = {args.draft} per token; the default first round drafts {base.first_k}")
    print(f"{'tokens':>6} {'accept':>6} " + " ".join(f"{'first k=' + str(f):>11}" for f in args.first_k))
    for tokens in args.tokens:
        for p in args.accept:
            cells = [statistics.mean(speed(AutoDraft(args.k_max, first_k=f), p, tokens, args.slope, args.draft, s)
                                     for s in range(args.seeds)) for f in args.first_k]
            print(f"{tokens:>6} {p:>6.2f} " + " ".join(f"{c:>11.3f}" for c in cells))


if __name__ == "__main__":
    main()

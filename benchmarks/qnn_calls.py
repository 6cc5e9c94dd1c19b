"""Per-call cost of a qnn-profile bundle's graphs: target (S rows) and assistant (one row), on the QNN HTP
(simulator on x86_64) and on the CPU EP running the same QDQ graphs; plus session load time.

    python benchmarks/qnn_calls.py BUNDLE [BUNDLE ...] [--calls 10]

Export bundles with different query rows to see how a call's cost grows with S:
    edgegen export --ep qnn --max-context 256 --draft-tokens 1|4|7 ...   (S = draft tokens + 1)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgegen.runtime.model import Bundle


def measure(path: str, ep: str, calls: int) -> dict:
    t0 = time.perf_counter()
    bundle = Bundle(path, ep=ep)
    load_s = time.perf_counter() - t0
    cache = bundle.new_cache()
    rows = bundle.target.rows
    rng = np.random.default_rng(0)
    vocab = bundle.manifest.model.vocab_size
    bundle.target.forward(cache, rng.integers(4, vocab, 2 * rows))  # warm up, and some context
    target, draft = [], []
    _, hidden = bundle.target.forward(cache, rng.integers(4, vocab, rows))
    for _ in range(calls):
        t = time.perf_counter()
        bundle.target.forward(cache, rng.integers(4, vocab, rows))
        target.append(time.perf_counter() - t)
        t = time.perf_counter()
        bundle.assistant.step(cache, int(rng.integers(4, vocab)), hidden[-1])
        draft.append(time.perf_counter() - t)
    return {"bundle": path, "ep": ep, "rows": rows, "load_s": round(load_s, 3),
            "target_ms_median": round(1e3 * float(np.median(target)), 1),
            "assistant_ms_median": round(1e3 * float(np.median(draft)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    for path in args.bundles:
        for ep in ("cpu", "qnn"):
            print(json.dumps(measure(path, ep, args.calls)), flush=True)


if __name__ == "__main__":
    main()

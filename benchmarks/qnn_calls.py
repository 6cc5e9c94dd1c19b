"""Per-call cost of qnn-profile bundles: target (S rows) and assistant (one row), on the QNN HTP (simulator
on x86_64) and on the CPU EP running the same QDQ graphs; plus session load time.

    python benchmarks/qnn_calls.py BUNDLE [BUNDLE ...] [--calls 10] [--ep qnn cpu]

Bundles are measured interleaved (one call of each in turn), so load from other processes hits them alike.
Export bundles with different query rows to see how a call's cost grows with S (S = draft tokens + 1):
    ExportOptions(ep="qnn", max_context=256, draft_tokens=1 | 4 | 7)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgegen.runtime.model import Bundle


def measure(paths: list[str], ep: str, calls: int) -> list[dict]:
    rng = np.random.default_rng(0)
    runs = []
    for path in paths:
        t0 = time.perf_counter()
        bundle = Bundle(path, ep=ep)
        load_s = time.perf_counter() - t0
        cache = bundle.new_cache()
        vocab = bundle.manifest.model.vocab_size
        _, hidden = bundle.target.forward(cache, rng.integers(4, vocab, 3 * bundle.target.rows))  # warm-up
        runs.append({"bundle": bundle, "cache": cache, "hidden": hidden[-1], "load_s": load_s, "target": [],
                     "assistant": [], "path": path, "vocab": vocab})
    for _ in range(calls):
        for run in runs:
            bundle, cache = run["bundle"], run["cache"]
            cache.trim(cache.length - bundle.target.rows)  # same context length every call
            t = time.perf_counter()
            bundle.target.forward(cache, rng.integers(4, run["vocab"], bundle.target.rows))
            run["target"].append(time.perf_counter() - t)
            t = time.perf_counter()
            bundle.assistant.step(cache, int(rng.integers(4, run["vocab"])), run["hidden"])
            run["assistant"].append(time.perf_counter() - t)
    return [{"bundle": r["path"], "ep": ep, "rows": r["bundle"].target.rows, "context": r["cache"].length,
             "load_s": round(r["load_s"], 3),
             "target_ms_median": round(1e3 * float(np.median(r["target"])), 1),
             "assistant_ms_median": round(1e3 * float(np.median(r["assistant"])), 1)} for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--ep", nargs="+", default=["cpu", "qnn"], choices=["cpu", "qnn"])
    args = ap.parse_args()
    for ep in args.ep:
        for row in measure(args.bundles, ep, args.calls):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

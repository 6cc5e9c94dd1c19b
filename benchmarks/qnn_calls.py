"""Per-call cost of qnn-profile bundles: target (S rows) and assistant (one row), on the QNN HTP (simulator
on x86_64) and on the CPU EP running the same QDQ graphs; plus session load time. Then session calls per
generated token of greedy speculative decoding (draft k = S - 1; a bundle with the fused `draft_round` drafts a
round in one call) and the calls and time of prefilling a long prompt (a bundle with a `prefill` graph feeds it
in chunks of P rows, else of S).

    python benchmarks/qnn_calls.py BUNDLE [BUNDLE ...] [--calls 10] [--ep qnn cpu] [--prompt 512]

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


class _Counter:
    """Counts the session calls of one graph (GraphSession.run) while installed."""

    def __init__(self, graph):
        self.graph, self.n, self._run = graph, 0, graph.run
        graph.run = self.run

    def run(self, feeds, cache):
        self.n += 1
        return self._run(feeds, cache)


def _counted(bundle: Bundle) -> dict[str, _Counter]:
    graphs = {"target": bundle.target, "prefill": getattr(bundle.target, "prefill", None),
              "assistant": bundle.assistant, "draft_round": bundle.draft_round}
    return {name: _Counter(g) for name, g in graphs.items() if g is not None}


def calls_per_token(path: str, ep: str, prompt_tokens: int, new_tokens: int = 48) -> dict:
    """Session calls per generated token of greedy speculative decoding, per graph (a short prompt's prefill included),
    and the target calls and seconds to prefill `prompt_tokens` random tokens."""
    from edgegen.runtime.generate import Generator

    bundle = Bundle(path, ep=ep)
    rows = bundle.target.rows
    vocab = bundle.manifest.model.vocab_size
    rng = np.random.default_rng(1)
    gen = Generator(bundle, draft_tokens=rows - 1)
    ids = gen.tokenizer.encode("def parse_args(argv=None):\n")
    gen.generate(ids[:4], 2)  # warm-up
    gen.reset()
    counters = _counted(bundle)  # the short prompt's prefill (2-3 target calls) included
    result = gen.generate(ids, new_tokens)
    n = len(result.token_ids)
    per_token = {name: round(c.n / n, 3) for name, c in counters.items()}
    prompt = rng.integers(4, vocab, prompt_tokens)
    cache = bundle.new_cache()
    targets = [c for name, c in counters.items() if name in ("target", "prefill")]
    before = sum(c.n for c in targets)
    t = time.perf_counter()
    bundle.target.forward(cache, prompt)
    prefill_s = time.perf_counter() - t
    return {"bundle": path, "ep": ep, "rows": rows, "tokens": n, "calls_per_token": per_token,
            "total_calls_per_token": round(sum(per_token.values()), 3),
            "acceptance": round(result.stats.accepted / max(result.stats.drafted, 1), 3),
            f"prefill_{prompt_tokens}_calls": sum(c.n for c in targets) - before,
            f"prefill_{prompt_tokens}_s": round(prefill_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--ep", nargs="+", default=["cpu", "qnn"], choices=["cpu", "qnn"])
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens of the prefill measurement")
    args = ap.parse_args()
    for ep in args.ep:
        for row in measure(args.bundles, ep, args.calls):
            print(json.dumps(row), flush=True)
        for path in args.bundles:
            print(json.dumps(calls_per_token(path, ep, args.prompt)), flush=True)


if __name__ == "__main__":
    main()

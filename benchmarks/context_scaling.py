"""Decode cost vs context length, on a preset whose weights (not attention) dominate a step.

    python benchmarks/context_scaling.py [--preset h1024] [--quant fp32] [--contexts 128,2048]

Builds a random-weight pair, exports it (once, cached under build/bench/), fills the KV cache to each
context length and times single-token decode steps at that length. Prints ms/step per context and the
ratio to the shortest context (goal: <= 1.5x at 2048 vs 128).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def ensure_bundle(preset: str, quant: str, max_context: int, verify: bool = False, tag: str = "") -> Path:
    """The preset's pair and its bundle, exported once and cached under build/bench/ (`tag`: a name suffix for
    bundles a caller exports differently)."""
    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.export.testing import save_pair

    root = REPO / "build" / "bench"
    pair = root / f"pair-{preset}"
    bundle = root / f"bundle-{preset}-{quant}-{max_context}{tag}"
    if not (pair / "assistant" / "config.json").is_file():
        save_pair(pair, preset)
    if not (bundle / "manifest.json").is_file():
        export_bundle(str(pair / "target"), str(pair / "assistant"), bundle,
                      ExportOptions(quant=quant, max_context=max_context, verify=verify, force=True))
    return bundle


def decode_ms(bundle, context: int, steps: int, rng: np.random.Generator) -> float:
    cache = bundle.new_cache()
    vocab = bundle.manifest.model.vocab_size
    while cache.length < context:  # prefill in chunks to bound activation memory
        n = min(512, context - cache.length)
        bundle.target.forward(cache, rng.integers(4, vocab, n))
    times = []
    for _ in range(steps + 3):
        t = time.perf_counter()
        bundle.target.forward(cache, [int(rng.integers(4, vocab))])
        times.append(time.perf_counter() - t)
        cache.trim(context)  # stay at this context length
    return 1000 * statistics.median(times[3:])


def generate_ms(bundle, context: int, new_tokens: int, rng: np.random.Generator) -> float:
    """Time per generated token (the whole runtime loop, drafting on auto) after a `context`-token prompt."""
    from edgegen.runtime.generate import Generator

    gen = Generator(bundle)
    vocab = bundle.manifest.model.vocab_size
    prompt = [int(t) for t in rng.integers(4, vocab, context)]
    gen.generate(prompt[:16], max_new_tokens=4)  # warm up sessions and the draft policy
    gen.reset()
    stats = gen.generate(prompt, max_new_tokens=new_tokens).stats
    return 1000 * (stats.elapsed_s - stats.time_to_first_token_s) / max(stats.new_tokens - 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="h1024")
    ap.add_argument("--quant", default="fp32")
    ap.add_argument("--contexts", default="128,2048")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["step", "generate"], default="step",
                    help="step: one target decode step; generate: ms per token of the whole loop")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    from edgegen.runtime.model import Bundle

    path = ensure_bundle(args.preset, args.quant, max(contexts) + 64)
    bundle = Bundle(path, threads=args.threads)
    rng = np.random.default_rng(0)
    if args.mode == "step":
        results = {c: decode_ms(bundle, c, args.steps, rng) for c in contexts}
    else:
        results = {c: generate_ms(bundle, c, args.steps, rng) for c in contexts}
    base = results[contexts[0]]
    rows = [{"context": c, "ms_per_step": round(ms, 2), "ratio": round(ms / base, 3)} for c, ms in results.items()]
    if args.json:
        print(json.dumps({"preset": args.preset, "quant": args.quant, "mode": args.mode, "rows": rows}))
    else:
        print(f"{args.preset} {args.quant}: {'decode step' if args.mode == 'step' else 'ms per generated token'}"
              " by context")
        for r in rows:
            print(f"  context {r['context']:>6}: {r['ms_per_step']:8.2f} ms   x{r['ratio']:.2f}")


if __name__ == "__main__":
    main()

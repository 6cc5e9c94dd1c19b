"""Decode cost on the E2B-shaped slice against the machine's memory roofline, and what it predicts.

    python benchmarks/e2b_roofline.py [--quant int4] [--compute int8|exact] [--threads 2] [--contexts 64,2048]
    python benchmarks/e2b_roofline.py --bundle E2B_BUNDLE --contexts 128,8192   # any exported bundle, e.g. the
                                            # full-size E2B stand-in's (benchmarks/realsize_export.py --out)

The slice (`e2b-slice` preset: E2B's hidden 1536, 1 KV head, head dims 256/512, per-layer embeddings 256,
double-wide MLP, vocabulary 32k, 10 layers of which 5 KV-shared, random weights, 651M parameters) is built
and exported once (cached under build/bench/). In one run this prints:

- memory bandwidth, measured on this machine with an fp32 GEMV through onnxruntime (256 MB matrix);
- the roofline: bytes a decode step must read (target weight files + the K/V rows it attends to) ÷ bandwidth;
- decode ms/token at each context, and its ratio to the roofline (goal <= 1.3x);
- verify cost: one target call on k+1 tokens ÷ one call on 1 token;
- drafter cost: one fused k-step draft round ÷ one target decode call;
- host overhead of the speculative loop (share of round time outside the two models' session calls);
- the speedup these costs predict at a range of tokens per target call (no per-position acceptance rates
  are published for the E2B assistant; Google reports ~2.2x on Apple-silicon edge models).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from context_scaling import REPO, ensure_bundle  # noqa: E402


def ensure_compute_bundle(preset: str, quant: str, max_context: int, compute: str) -> Path:
    """The pair exported with `--compute int8` (MatMulNBits with int8 activations) or `exact`, cached."""
    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.export.testing import save_pair

    pair = REPO / "build" / "bench" / f"pair-{preset}"
    if not (pair / "assistant" / "config.json").is_file():
        save_pair(pair, preset)
    bundle = REPO / "build" / "bench" / f"bundle-{preset}-{quant}-{compute}compute-{max_context}"
    if not (bundle / "manifest.json").is_file():
        export_bundle(str(pair / "target"), str(pair / "assistant"), bundle,
                      ExportOptions(quant=quant, max_context=max_context, verify=False, force=True, compute=compute))
    return bundle


def bandwidth_gbs(threads: int, mbytes: int = 256, repeats: int = 30) -> float:
    """Sustained read bandwidth: an fp32 GEMV y = x W with W far larger than the caches."""
    from onnx import TensorProto, helper

    k = 4096
    n = mbytes * (1 << 20) // (4 * k)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    x = np.ones((1, k), np.float32)
    feeds = {"x": x, "w": w}
    sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return w.nbytes / statistics.median(times) / 1e9


def step_bytes(bundle, context: int) -> tuple[int, int]:
    """(weight bytes, K/V bytes) one target decode step reads. Every byte of the target's weight files is
    read (the tied embedding table is the lm_head); per-layer embeddings are a few gathered rows (ignored);
    each attention layer reads its K/V rows: the sliding window or the whole context."""
    m = bundle.manifest
    files = {m.graphs["target"].file.replace(".onnx", ".weights"), "shared.weights"}
    weights = sum((bundle.path / f).stat().st_size for f in files if (bundle.path / f).is_file())
    window = m.model.sliding_window
    shape = {b.kind: b.kv_heads * b.head_dim for b in m.model.kv_buffers}  # KV-shared layers read their store's
    kv = 0
    for kind in m.model.layer_types:
        rows = min(context, window) if kind == "sliding_attention" else context
        kv += 2 * rows * shape[kind] * 4
    return weights, kv


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def costs_at(bundle, context: int, k: int, repeats: int, rng) -> dict:
    """ms of: a 1-token target call, a (k+1)-token target call, a fused k-step draft round, at `context`."""
    cache = bundle.new_cache()
    vocab = bundle.manifest.model.vocab_size
    while cache.length < context:
        bundle.target.forward(cache, rng.integers(4, vocab, min(512, context - cache.length)))
    _, hidden = bundle.target.forward(cache, [7])
    cache.trim(context)

    def target(n: int):
        def call():
            bundle.target.forward(cache, rng.integers(4, vocab, n), logits_to_keep=n)
            cache.trim(context)
        return call

    out = {"context": context, "target_1": _median_ms(target(1), repeats),
           f"target_{k + 1}": _median_ms(target(k + 1), repeats)}
    if bundle.draft_round is not None and bundle.draft_round.steps == k:
        out[f"draft_round_{k}"] = _median_ms(lambda: bundle.draft_round.run_round(cache, 7, hidden[-1]), repeats)
    return out


def host_share(bundle_path: Path, threads: int, k: int, new_tokens: int) -> dict:
    """Share of speculative decode time spent outside the target's and drafter's session calls."""
    from edgegen.runtime.generate import Generator

    gen = Generator(bundle_path, threads=threads, draft_tokens=k)
    prompt = [int(t) for t in np.random.default_rng(1).integers(4, gen.bundle.manifest.model.vocab_size, 64)]
    gen.generate(prompt[:8], max_new_tokens=4)
    gen.reset()
    stats = gen.generate(prompt, max_new_tokens=new_tokens).stats
    decode = stats.elapsed_s - stats.time_to_first_token_s
    models = (stats.target_s - stats.prefill_s) + stats.draft_s
    return {"rounds": stats.target_calls, "decode_s": round(decode, 3),
            "host_share": round(max(decode - models, 0.0) / decode, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="e2b-slice")
    ap.add_argument("--quant", default="int4", choices=["fp32", "int8", "int4"])
    ap.add_argument("--compute", default="int8", choices=["exact", "int8"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="64,2048")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--bundle", type=Path, help="measure this bundle instead of exporting --preset")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    k = args.draft_tokens

    from edgegen.runtime.model import Bundle

    max_context = max(4096, max(contexts) + 64)
    if args.bundle:
        path = args.bundle
    elif args.quant != "fp32":
        path = ensure_compute_bundle(args.preset, args.quant, max_context, args.compute)
    else:
        path = ensure_bundle(args.preset, args.quant, max_context)
    bundle = Bundle(path, threads=args.threads)
    bw = bandwidth_gbs(args.threads)
    what = str(args.bundle) if args.bundle else f"{args.preset} {args.quant} ({args.compute} compute)"
    print(f"{what}, {args.threads} threads; memory bandwidth (fp32 GEMV, 256 MB): {bw:.1f} GB/s")
    rng = np.random.default_rng(0)
    rows = []
    for ctx in contexts:
        c = costs_at(bundle, ctx, k, args.repeats, rng)
        weights, kv = step_bytes(bundle, ctx)
        c["roofline_ms"] = (weights + kv) / bw / 1e6
        c["vs_roofline"] = c["target_1"] / c["roofline_ms"]
        c["verify_ratio"] = c[f"target_{k + 1}"] / c["target_1"]
        if f"draft_round_{k}" in c:
            c["drafter_ratio"] = c[f"draft_round_{k}"] / c["target_1"]
        c["bytes"] = {"weights": weights, "kv": kv}
        rows.append(c)
        line = (f"context {ctx:5d}: decode {c['target_1']:6.1f} ms/token, roofline {c['roofline_ms']:5.1f} ms "
                f"({weights / 1e6:.0f} MB weights + {kv / 1e6:.1f} MB K/V) -> {c['vs_roofline']:.2f}x roofline; "
                f"verify {k + 1} tokens {c[f'target_{k + 1}']:.1f} ms = {c['verify_ratio']:.2f}x one")
        if "drafter_ratio" in c:
            line += f"; {k}-step draft round {c[f'draft_round_{k}']:.1f} ms = {c['drafter_ratio']:.2f}x one target call"
        print(line)
    cache = bundle.new_cache()
    kv_mb, cache_context = cache.nbytes / 1e6, cache.max_context
    del cache
    del bundle
    host = host_share(path, args.threads, k, 64)
    print(f"host code: {100 * host['host_share']:.1f}% of speculative decode time ({host['rounds']} rounds, k={k})")
    from edgegen.runtime.osinfo import peak_rss_mb

    bundle_mb = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()) / 1e6
    print(f"peak RSS {peak_rss_mb()} MB (bundle files {bundle_mb:.0f} MB, one K/V cache {kv_mb:.0f} MB for "
          f"{cache_context} positions)")
    base = rows[0]
    if "drafter_ratio" in base:
        round_cost = base["verify_ratio"] + base["drafter_ratio"]
        preds = {t: t / round_cost for t in (1.5, 2.0, 2.5, 3.0, 3.5)}
        print(f"predicted speedup at context {base['context']} (k={k}; round = verify + draft = "
              f"{round_cost:.2f} decode steps): "
              + ", ".join(f"{t} tok/call -> {s:.2f}x" for t, s in preds.items()))
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_gbs": bw, "contexts": rows, "host": host}, indent=2) + "\n")


if __name__ == "__main__":
    main()

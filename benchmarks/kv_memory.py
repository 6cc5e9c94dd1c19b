"""KV cache memory and decode time at long contexts: full-length float32 buffers vs ring buffers for sliding
layers (float32 and float16).

    python benchmarks/kv_memory.py [--contexts 4096,32768,131072] [--json]
    python benchmarks/kv_memory.py --decode [--preset e2b-slice] [--decode-contexts 8192,32768]

Memory: the KV buffer list export writes for the published E2B config (export/data/gemma4/pairs.json; no
export needed), allocated as a real KVCache; bytes, and the resident memory after every row has been written
once (each case in a fresh process: np.zeros pages are committed only when written).
Goals: at 32K the ring + float32 cache is at most 1/3 of full-length float32; at 128K ring + float16 <= 1 GiB.

Decode (--decode): a random-weight pair of the preset, exported twice (int4, no verification, cached under
build/bench/): with full-length buffers (the layout before rings: the cpu profile with ring_kv off, the same
graphs as before) and with rings. The caches are filled with random K/V rows to each context (no prefill, which
would take minutes at 32K), then single-token decode steps are timed, the two layouts in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LAYOUTS = {"full fp32": (False, "float32"), "ring fp32": (True, "float32"), "ring fp16": (True, "float16")}


def e2b_buffers(max_context: int, ring: bool, dtype: str) -> tuple[list[dict], int]:
    """The manifest's kv_buffers for E2B at this context and layout (as export writes them), and its window."""
    from edgegen.export.contents import model_spec
    from edgegen.export.graphs import PROFILES, kv_ring, plan_target
    from edgegen.export.testing import realsize_configs

    cfg, assistant = realsize_configs("e2b")
    profile = dataclasses.replace(PROFILES["cpu"], ring_kv=ring)
    length = kv_ring(profile, [cfg.sliding_window, assistant.get_text_config().sliding_window], max_context)
    spec = model_spec(cfg, plan_target(cfg, length), max_context, None, dtype)
    return [dataclasses.asdict(b) for b in spec.kv_buffers], cfg.sliding_window


def child(payload: str) -> None:
    """Allocate the cache, write every row once, print bytes and resident memory (runtime imports only)."""
    import psutil

    from edgegen.runtime.kv import KVCache
    from edgegen.runtime.manifest import KVBuffer

    args = json.loads(payload)
    proc = psutil.Process()
    before = proc.memory_info().rss
    cache = KVCache([KVBuffer(**b) for b in args["buffers"]], args["max_context"], args["window"])
    allocated = proc.memory_info().rss
    for a in cache.arrays.values():
        for start in range(0, a.shape[2], 4096):  # row blocks: every row written once, in place
            a[:, :, start:start + 4096] = 1
    touched = proc.memory_info().rss
    print(json.dumps({"bytes": cache.nbytes, "rss_after_alloc_mib": (allocated - before) / 2**20,
                      "rss_after_touch_mib": (touched - before) / 2**20}))


def memory(contexts: list[int]) -> list[dict]:
    rows = []
    for ctx in contexts:
        for name, (ring, dtype) in LAYOUTS.items():
            buffers, window = e2b_buffers(ctx, ring, dtype)
            payload = json.dumps({"buffers": buffers, "max_context": ctx, "window": window})
            out = subprocess.run([sys.executable, __file__, "--child", payload], capture_output=True, text=True,
                                 check=True).stdout
            rows.append({"context": ctx, "layout": name, **json.loads(out)})
    return rows


def ensure_bundle(preset: str, max_context: int, ring: bool) -> Path:
    """context_scaling's cached int4 bundle, exported with the cpu profile's rings on or off."""
    from context_scaling import ensure_bundle as cached_bundle

    from edgegen.export import graphs

    cpu = graphs.PROFILES["cpu"]
    graphs.PROFILES["cpu"] = dataclasses.replace(cpu, ring_kv=ring)
    try:
        return cached_bundle(preset, "int4", max_context, tag="-ring" if ring else "-full")
    finally:
        graphs.PROFILES["cpu"] = cpu


def filled_cache(bundle, context: int, rng: np.random.Generator):
    """A cache holding random K/V for positions [0, context) (a ring keeps the last R)."""
    cache = bundle.new_cache(context + 64)
    for name, a in cache.arrays.items():
        rows = min(context, cache.ring[name] or context)
        cache.write(name, rng.standard_normal((1, a.shape[1], rows, a.shape[3]), np.float32), context - rows)
    cache.length = context
    return cache


def decode(preset: str, contexts: list[int], steps: int, threads: int) -> list[dict]:
    """Both layouts loaded at once and stepped in turn, so that the load of a shared machine falls on both."""
    from edgegen.runtime.model import Bundle

    layouts = {"full fp32": False, "ring fp32": True}
    bundles = {name: Bundle(ensure_bundle(preset, max(contexts) + 64, ring), threads=threads)
               for name, ring in layouts.items()}
    rng = np.random.default_rng(0)
    vocab = next(iter(bundles.values())).manifest.model.vocab_size
    rows = []
    for ctx in contexts:
        caches = {name: filled_cache(b, ctx, rng) for name, b in bundles.items()}
        times: dict[str, list[float]] = {name: [] for name in bundles}
        for _ in range(steps + 3):
            token = int(rng.integers(4, vocab))
            for name, b in bundles.items():
                t = time.perf_counter()
                b.target.forward(caches[name], [token])
                times[name].append(time.perf_counter() - t)
                caches[name].trim(ctx)  # stay at this context length
        for name in bundles:
            rows.append({"preset": preset, "layout": name, "context": ctx,
                         "ms_per_step": round(1000 * statistics.median(times[name][3:]), 2),
                         "min_ms": round(1000 * min(times[name][3:]), 2),
                         "kv_mib": round(caches[name].nbytes / 2**20, 1)})
        del caches
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--decode", action="store_true", help="time decode steps instead of measuring memory")
    ap.add_argument("--preset", default="e2b-slice")
    ap.add_argument("--decode-contexts", default="8192,32768")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.decode:
        rows = decode(args.preset, [int(c) for c in args.decode_contexts.split(",")], args.steps, args.threads)
        if args.json:
            print(json.dumps(rows))
        for r in rows:
            print(f"{r['preset']} {r['layout']:<10} context {r['context']:>6}: {r['ms_per_step']:8.2f} ms/step "
                  f"(min {r['min_ms']:.2f})  KV {r['kv_mib']:8.1f} MiB")
        return
    rows = memory([int(c) for c in args.contexts.split(",")])
    if args.json:
        print(json.dumps(rows))
    full = {r["context"]: r["bytes"] for r in rows if r["layout"] == "full fp32"}
    print("E2B KV cache (15 store layers: 12 sliding, 3 full)")
    for r in rows:
        share = r["bytes"] / full[r["context"]]
        print(f"  {r['context']:>6} {r['layout']:<10} {r['bytes'] / 2**30:7.3f} GiB ({share:.3f} of full fp32)"
              f"  RSS after alloc {r['rss_after_alloc_mib']:7.1f} MiB, after writing every row "
              f"{r['rss_after_touch_mib']:8.1f} MiB")


if __name__ == "__main__":
    main()

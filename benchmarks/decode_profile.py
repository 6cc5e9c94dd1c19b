"""Where one target decode step spends its time: onnxruntime's per-node profile and the host code around it.

    python benchmarks/decode_profile.py --bundle BUNDLE [--contexts 128,2048] [--threads 2] [--steps 20]
    python benchmarks/decode_profile.py --bundle BUNDLE --rows 128     # a prefill chunk instead of a decode step

For each context the bundle's target is run `--steps` times on `--rows` new tokens (the cache trimmed back
after each call) in a session with onnxruntime's profiler on (SessionOptions.enable_profiling). The JSON
trace it writes is parsed: kernel time per op type and the most expensive nodes, in ms per call (median
over the steps of each node's time, summed), next to the wall time of the whole session call. Host-side
pieces of Target.forward are timed on their own around it: the per-layer-embedding gather + dequantization
(PLETable), building the IOBinding, and the run itself (the session's overhead = run - sum of kernels).

Profiling is not free: each node's events cost microseconds (full-size E2B, 1,760 nodes after onnxruntime's
fusions, 1 thread: a profiled call took 122 ms, an unprofiled one 88 ms), so "the executor between kernels"
is mostly the profiler itself, and small ops look dearer than they are. Read the kernel time per op type,
and the unprofiled Target.forward for the real cost.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np


def profiled_bundle(path: Path, threads: int, prefix: str):
    """A Bundle whose sessions write onnxruntime profiles (edgegen's own session options + profiling)."""
    from speed_sweep import bundle_with

    def tweak(so):
        so.enable_profiling = True
        so.profile_file_prefix = prefix

    return bundle_with(path, threads, tweak, spin=True)


def fill(bundle, cache, context: int, rng) -> None:
    vocab = bundle.manifest.model.vocab_size
    while cache.length < context:
        bundle.target.forward(cache, rng.integers(4, vocab, min(512, context - cache.length)))


def host_timings(bundle, cache, rows: int, steps: int, rng) -> dict[str, float]:
    """Median ms of the host pieces of one target call at the cache's length (the cache is trimmed back)."""
    target, context = bundle.target, cache.length
    vocab = bundle.manifest.model.vocab_size
    parts = collections.defaultdict(list)
    for _ in range(steps):
        ids = rng.integers(4, vocab, rows).reshape(1, -1)
        t0 = time.perf_counter()
        if target.ple is not None:
            target.ple(ids)
        t1 = time.perf_counter()
        b = target.session.io_binding()
        for name, value in cache.values.items():
            if name in target.input_names:
                b.bind_ortvalue_input(name, value)
        t2 = time.perf_counter()
        target.forward(cache, ids[0], logits_to_keep=1)
        t3 = time.perf_counter()
        cache.trim(context)
        parts["ple"].append(t1 - t0)
        parts["bind kv"].append(t2 - t1)
        parts["forward"].append(t3 - t2)
    return {k: 1000 * statistics.median(v) for k, v in parts.items()}


def parse_profile(path: Path, calls: int) -> tuple[dict, dict, list[float]]:
    """(ms per call by op type, ms per call by node, wall ms of each model_run) from an ORT trace, using
    the last `calls` runs."""
    events = json.loads(path.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs = runs[-calls:]
    start = runs[0]["ts"]
    per_node = collections.defaultdict(list)
    node_op = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        node = e["name"][: -len("_kernel_time")]
        per_node[node].append(e["dur"])
        node_op[node] = e.get("args", {}).get("op_name", "?")
    by_node = {n: statistics.median(v) / 1000 for n, v in per_node.items()}
    by_op = collections.defaultdict(float)
    count = collections.Counter()
    for n, ms in by_node.items():
        by_op[node_op[n]] += ms
        count[node_op[n]] += 1
    ops = {op: (ms, count[op]) for op, ms in by_op.items()}
    return ops, {n: (ms, node_op[n]) for n, ms in by_node.items()}, [r["dur"] / 1000 for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--contexts", default="128,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1, help="new tokens per call (1: decode; k+1: verify; prefill chunk)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgegen-profile"))
    args = ap.parse_args()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    rng = np.random.default_rng(0)
    args.out.mkdir(parents=True, exist_ok=True)
    from edgegen.runtime.model import Bundle

    for ctx in [int(c) for c in args.contexts.split(",")]:
        bundle = profiled_bundle(args.bundle, args.threads, str(args.out / f"ctx{ctx}"))
        cache = bundle.new_cache()
        fill(bundle, cache, ctx, rng)
        vocab = bundle.manifest.model.vocab_size
        for _ in range(args.steps):
            bundle.target.forward(cache, rng.integers(4, vocab, args.rows), logits_to_keep=1)
            cache.trim(ctx)
        trace = Path(bundle.target.session.end_profiling())
        ops, nodes, walls = parse_profile(trace, args.steps)
        trace.unlink()
        if bundle.draft_round is not None:  # the single-step assistant opens on first use: never here
            Path(bundle.draft_round.session.end_profiling()).unlink(missing_ok=True)
        del bundle, cache
        plain = Bundle(args.bundle, threads=args.threads, hashes="never")
        cache = plain.new_cache()
        fill(plain, cache, ctx, rng)
        host = host_timings(plain, cache, args.rows, args.steps, rng)
        del plain, cache
        kernels = sum(ms for ms, _ in ops.values())
        wall = statistics.median(walls)
        print(f"\ncontext {ctx}, {args.rows} new row(s), {args.threads} threads, median of {args.steps} calls")
        print(f"  profiled session run {wall:.1f} ms, kernels {kernels:.1f} ms ({len(nodes)} nodes; "
              f"the rest, {wall - kernels:.1f} ms, is the executor between kernels)")
        print(f"  unprofiled: Target.forward {host['forward']:.1f} ms; inside it on the host: PLE gather+dequant "
              f"{host['ple']:.2f} ms, binding K/V {host['bind kv']:.2f} ms")
        print("  by op type (ms per call, share of kernels, nodes):")
        for op, (ms, n) in sorted(ops.items(), key=lambda kv: -kv[1][0]):
            if ms >= 0.05 * kernels / 100 or ms > 0.05:
                print(f"    {op:28s} {ms:8.2f} ms {100 * ms / kernels:5.1f}%  x{n}")
        print(f"  top {args.top} nodes:")
        for n, (ms, op) in sorted(nodes.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"    {ms:7.2f} ms  {op:22s} {n}")
    print("\nuptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()

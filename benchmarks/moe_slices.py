"""Real-dimension 26B-A4B slices and the full depth: export memory against depth, decode cost, RSS.

    python benchmarks/moe_slices.py [--layers 4 8] [--quant int4] [--block-size 32] [--root DIR] [--keep]
    python benchmarks/moe_slices.py --layers 4 30      # and the full 30-layer model (~66 GB of disk)

A slice is the published 26B-A4B target (data/gemma4/pairs.json: hidden 2816, 128 experts of width 704, top-8,
the dense MLP beside them, K=V full layers, the 262,144-token vocabulary and tokenizer) cut to its first L
layers (the last one full attention), with random bf16 weights, and the published assistant
(edgegen.export.testing.realsize_pair, layers=L: ~1.5 GB of disk per layer + 2.3 GB). For each depth, one
at a time so the disk holds one slice and one bundle:

1. `edgegen export` in a child process: peak RSS (wait4's ru_maxrss, what `/usr/bin/time -v` reports as
   "Maximum resident set size"), wall time, bundle size. Export runs with --no-verify: the check against
   PyTorch loads one layer's 128 experts in float32 and float64 (~9 GB at this width), which this shared
   machine cannot spare; the graphs themselves are checked against PyTorch on the moe-like preset
   (tests/test_export_parity.py).
2. A child process opens the bundle and times target calls at a 256-token context, interleaved: decode
   (1 token) and verify (5 tokens, a 4-draft round); then 32 tokens of plain greedy decoding. Its RSS
   after decoding and its peak are recorded.
3. The slice and the bundle are deleted.

Then: bytes one decode step reads (each expert tensor counts k/E of its bytes: the step runs k of E
experts per layer; every other weight is read whole, the tied table being the lm_head) against all weight
bytes; ms/token against that roofline at the bandwidth measured here; and the full 30-layer bundle's
size and RSS, extrapolated linearly in depth from the two slices (per-layer cost from their difference).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realsize_export import bundle_bytes, run_measured  # noqa: E402

GIB = 1 << 30

FULL_LAYERS = 30
CONTEXT, REPEATS, VERIFY = 256, 12, 5

_CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np
from edgegen.runtime.generate import Generator
from edgegen.runtime.model import Bundle

path, context, repeats, verify = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
bundle = Bundle(path, threads=2)
rng = np.random.default_rng(0)
vocab = bundle.manifest.model.vocab_size
cache = bundle.new_cache()
bundle.target.forward(cache, rng.integers(4, vocab, context))
one, many = [], []
for i in range(repeats + 1):
    for n, out in ((1, one), (verify, many)):
        t = time.perf_counter()
        bundle.target.forward(cache, rng.integers(4, vocab, n), logits_to_keep=n)
        out.append(time.perf_counter() - t)
        cache.trim(context)
del cache
gen = Generator(bundle)
prompt = [2, *(int(x) for x in rng.integers(4, vocab, 31))]
r = gen.generate(prompt, 32, use_assistant=False)
decode_s = r.stats.elapsed_s - r.stats.time_to_first_token_s
rss = int(open("/proc/self/statm").read().split()[1]) * 4096
print(json.dumps({"decode_ms": 1e3 * statistics.median(one[1:]), "verify_ms": 1e3 * statistics.median(many[1:]),
                  "generate_ms_per_token": 1e3 * decode_s / max(1, len(r.token_ids) - 1),
                  "rss_after_decoding": rss, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _initializers(graph):
    """A graph's initializers and those of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _initializers(sub)


def step_bytes(bundle: Path) -> dict:
    """Weight bytes of the target graph: all of them, and what one decode step reads (experts: k of E)."""
    import onnx

    m = json.loads((bundle / "manifest.json").read_text())
    graph = onnx.load(str(bundle / m["graphs"]["target"]["file"]), load_external_data=False).graph
    total = active = 0
    seen = set()
    for init in _initializers(graph):
        info = {e.key: e.value for e in init.external_data}
        where = (info.get("location"), info.get("offset"))
        if "offset" in info and where in seen:  # an alias of bytes already counted (Graph.alias)
            continue
        seen.add(where)
        size = int(info["length"]) if "length" in info else len(init.SerializeToString())
        total += size
        active += size * (TOP_K / EXPERTS if ".experts." in init.name else 1)
    return {"weights": total, "decode_reads": int(active)}


def slice_row(layers: int, args) -> dict:
    from edgegen.export.testing import realsize_pair

    root = Path(args.root)
    t0 = time.monotonic()
    target, assistant = realsize_pair("26b-a4b", root, layers=layers)
    built = time.monotonic() - t0
    out = Path(tempfile.mkdtemp(prefix=f"moe-L{layers}-", dir=root)) / "bundle"
    try:
        cmd = [sys.executable, "-m", "edgegen", "export", "--target", str(target), "--assistant", str(assistant),
               "--out", str(out), "--quant", args.quant, "--block-size", str(args.block_size), "--max-context", "2048",
               "--force", "--no-verify"]
        code, seconds, peak, log = run_measured(cmd)
        if code:
            sys.exit(f"export failed ({code}):\n{log}")
        row = {"layers": layers, "slice_built_s": round(built), "export_s": round(seconds),
               "export_peak_rss": peak, "bundle_bytes": bundle_bytes(out), **step_bytes(out)}
        print(json.dumps(row), flush=True)
        code, _, _, log = run_measured([sys.executable, "-c", _CHILD, str(out), str(CONTEXT), str(REPEATS),
                                        str(VERIFY)])
        if code:
            sys.exit(f"decoding failed ({code}):\n{log}")
        row.update(json.loads(log.strip().splitlines()[-1]))
        return row
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(target.parent, ignore_errors=True)


EXPERTS, TOP_K = 128, 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--quant", default="int4", choices=["fp32", "int8", "int4"])
    ap.add_argument("--block-size", type=int, default=32, help="export --block-size (int4/int8 blocks, with a "
                    "float32 scale each: 32 -> 0.625 bytes per int4 weight, 128 -> 0.53)")
    ap.add_argument("--root", default=os.environ.get("EDGEGEN_CACHE", "build/moe"))
    ap.add_argument("--keep", action="store_true", help="keep the slices' checkpoints")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from e2b_roofline import bandwidth_gbs

    bw = bandwidth_gbs(2)
    print(f"memory bandwidth (fp32 GEMV, 256 MB, 2 threads): {bw:.1f} GB/s", flush=True)
    rows = [slice_row(layers, args) for layers in args.layers]
    for r in rows:
        roofline = r["decode_reads"] / bw / 1e6
        r["roofline_ms"] = roofline
        print(f"{r['layers']} layers: export peak RSS {r['export_peak_rss'] / GIB:.2f} GiB ({r['export_s']} s), "
              f"bundle {r['bundle_bytes'] / 1e9:.2f} GB; decode {r['decode_ms']:.1f} ms/token "
              f"(greedy generation {r['generate_ms_per_token']:.1f}), verify-{VERIFY} {r['verify_ms']:.1f} ms = "
              f"{r['verify_ms'] / r['decode_ms']:.2f}x decode; a decode step reads {r['decode_reads'] / 1e9:.2f} GB "
              f"of {r['weights'] / 1e9:.2f} GB target weights -> roofline {roofline:.1f} ms, "
              f"{r['decode_ms'] / roofline:.2f}x; RSS decoding {r['rss_after_decoding'] / GIB:.2f} GiB "
              f"(peak {r['peak_rss'] / GIB:.2f})")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        span = b["layers"] - a["layers"]
        print(f"export peak RSS, {b['layers']} vs {a['layers']} layers: "
              f"{100 * (b['export_peak_rss'] / a['export_peak_rss'] - 1):+.1f}%")
        for key in ("rss_after_decoding", "bundle_bytes", "decode_reads"):
            per_layer = (b[key] - a[key]) / span
            full = a[key] + per_layer * (FULL_LAYERS - a["layers"])
            print(f"{key}: {a[key] / GIB:.2f} GiB at {a['layers']} layers + {per_layer / GIB:.3f} GiB/layer x "
                  f"{FULL_LAYERS - a['layers']} = {full / GIB:.2f} GiB at {FULL_LAYERS} layers")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_gbs": bw, "slices": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

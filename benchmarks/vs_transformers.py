"""edgegen vs transformers' own speculative decoding, same pair, fp32, identical tokens.

    python benchmarks/vs_transformers.py [--pair models/demo] [--new-tokens 128] [--draft-tokens 4]

Both sides generate greedily from the same prompts with the same assistant and the same number of draft
tokens; the script checks that the token ids are identical and prints tokens/s of each and the ratio
(goal: edgegen >= 5x). Threads: torch and onnxruntime both use all cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = (
    "def parse_args(argv=None):\n",
    "class Stack:\n    def __init__(self):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "The quick brown fox",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default=str(REPO / "models" / "demo"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.export.loading import load_pair
    from edgegen.runtime.generate import Generator

    pair_dir = Path(args.pair)
    bundle = REPO / "build" / "bench" / f"vs-hf-{pair_dir.name}"
    if not (bundle / "manifest.json").is_file():
        export_bundle(str(pair_dir / "target"), str(pair_dir / "assistant"), bundle,
                      ExportOptions(max_context=1024, draft_tokens=args.draft_tokens, force=True))
    pair = load_pair(str(pair_dir / "target"), str(pair_dir / "assistant"), draft_tokens=args.draft_tokens)
    gen = Generator(bundle, draft_tokens=args.draft_tokens)
    tok = gen.tokenizer
    rows = []
    for text in PROMPTS:
        ids = tok.encode(text)
        with torch.no_grad():  # warm-up, then timed
            pair.target.generate(torch.tensor([ids]), assistant_model=pair.assistant, max_new_tokens=4,
                                 do_sample=False)
            t = time.perf_counter()
            out = pair.target.generate(torch.tensor([ids]), assistant_model=pair.assistant,
                                       max_new_tokens=args.new_tokens, do_sample=False)
            hf_s = time.perf_counter() - t
        hf_ids = out[0, len(ids):].tolist()
        gen.reset()
        gen.generate(ids, max_new_tokens=4)
        gen.reset()
        t = time.perf_counter()
        ours = gen.generate(ids, max_new_tokens=args.new_tokens)
        eg_s = time.perf_counter() - t
        rows.append({"prompt": text[:24], "tokens": len(hf_ids), "identical": ours.token_ids == hf_ids,
                     "transformers_tok_s": round(len(hf_ids) / hf_s, 1),
                     "edgegen_tok_s": round(len(ours.token_ids) / eg_s, 1),
                     "edgegen_tokens_per_call": round(ours.stats.tokens_per_target_call, 2)})
    hf_total = sum(r["tokens"] / r["transformers_tok_s"] for r in rows)
    eg_total = sum(r["tokens"] / r["edgegen_tok_s"] for r in rows)
    summary = {"pair": str(pair_dir), "draft_tokens": args.draft_tokens, "rows": rows,
               "all_identical": all(r["identical"] for r in rows), "speedup": round(hf_total / eg_total, 2)}
    if args.json:
        print(json.dumps(summary))
        return
    for r in rows:
        print(f"  {r['prompt']!r:28} {r['tokens']:4d} tok  transformers {r['transformers_tok_s']:7.1f} tok/s  "
              f"edgegen {r['edgegen_tok_s']:7.1f} tok/s  ({r['edgegen_tokens_per_call']} tok/call)  "
              f"identical={r['identical']}")
    print(f"edgegen / transformers: x{summary['speedup']}  (all identical: {summary['all_identical']})")


if __name__ == "__main__":
    main()

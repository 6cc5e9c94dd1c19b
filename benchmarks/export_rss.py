"""Peak memory of `edgegen export` relative to the fp32 weight bytes of the pair.

    python benchmarks/export_rss.py [--preset h1024] [--quant fp32] [--no-verify]

Runs the export CLI in a child process and reads its peak RSS (getrusage of children). Goal: <= 1.5x
the fp32 bytes of target + assistant parameters.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fp32_weight_bytes(model_dir: Path) -> int:
    """Parameter count x 4 from the safetensors headers (tied weights are stored once there too)."""
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            total += 4 * count
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="h1024")
    ap.add_argument("--quant", default="fp32")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    from edgegen.export.testing import save_pair

    pair = REPO / "build" / "bench" / f"pair-{args.preset}"
    if not (pair / "assistant" / "config.json").is_file():
        save_pair(pair, args.preset)
    weights = fp32_weight_bytes(pair / "target") + fp32_weight_bytes(pair / "assistant")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "edgegen", "export", "--target", str(pair / "target"), "--assistant",
               str(pair / "assistant"), "--out", str(Path(tmp) / "bundle"), "--quant", args.quant]
        if args.no_verify:
            cmd.append("--no-verify")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"preset": args.preset, "quant": args.quant, "verify": not args.no_verify,
                      "fp32_weight_bytes": weights, "peak_rss_bytes": peak, "ratio": round(peak / weights, 3)}))


if __name__ == "__main__":
    main()

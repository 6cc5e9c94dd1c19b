"""Export a full-size Gemma 4 stand-in (E2B or E4B shape, real tokenizer, random bf16 weights) and measure it.

    python benchmarks/realsize_export.py [--preset e2b] [--quant int4] [--multimodal] [--no-verify] [--run]

Builds the stand-in on first use (edgegen.export.testing.realsize_pair, cached under $EDGEGEN_CACHE/presets or
~/.cache/edgegen/presets: E2B ~9.3 GB of disk, E4B ~16 GB), runs `edgegen export` in a child process and
prints its peak RSS (the child's own rusage, what `/usr/bin/time -v` calls "Maximum resident set size"),
wall time and bundle size. `--run` then generates 8 tokens with the bundle (`edgegen run --stats`) and
prints that process's peak RSS too. Goals: E2B int4 with verification <= 8 GiB peak and <= 3.2 GB bundle;
E4B <= 10 GiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30


def run_measured(args: list[str]) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS bytes, stdout+stderr) of a child process."""
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - start, usage.ru_maxrss * 1024, out


def bundle_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="e2b", choices=["e2b", "e4b"])
    ap.add_argument("--quant", default="int4", choices=["fp32", "int8", "int4"])
    ap.add_argument("--multimodal", action="store_true",
                    help="the published multimodal layout (Gemma4ForConditionalGeneration, vision/audio towers)")
    ap.add_argument("--root", type=Path, default=None, help="where stand-ins are built [default: the edgegen cache]")
    ap.add_argument("--out", type=Path, default=None, help="bundle directory [default: a temp dir, removed after]")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--compute", default="auto", choices=["auto", "exact", "int8"],
                    help="export --compute [default: auto, the export's own default]")
    ap.add_argument("--max-context", type=int, default=4096, help="positions the bundle holds (its K/V buffers)")
    ap.add_argument("--run", action="store_true", help="also generate 8 tokens with the bundle and measure that")
    args = ap.parse_args()

    from edgegen.export.testing import realsize_pair

    t0 = time.monotonic()
    target, assistant = realsize_pair(args.preset, args.root, conditional=args.multimodal)
    print(f"stand-in: {target.parent} (ready in {time.monotonic() - t0:.0f} s)", flush=True)

    scratch = None
    out = args.out
    if out is None:
        scratch = Path(tempfile.mkdtemp(prefix=f"edgegen-{args.preset}-"))
        out = scratch / "bundle"
    try:
        cmd = [sys.executable, "-m", "edgegen", "export", "--target", str(target), "--assistant", str(assistant),
               "--out", str(out), "--quant", args.quant, "--max-context", str(args.max_context), "--force", "--stats",
               "--compute", args.compute]
        if args.no_verify:
            cmd.append("--no-verify")
        code, seconds, peak, log = run_measured(cmd)
        print("\n".join(log.strip().splitlines()[-2:]))
        if code:
            sys.exit(f"export failed ({code}):\n{log}")
        size = bundle_bytes(out)
        verified = "without" if args.no_verify else "with"
        print(f"{args.preset} {args.quant} export {verified} verification: peak RSS {peak / GIB:.2f} GiB, "
              f"{seconds:.0f} s, bundle {size / 1e9:.2f} GB")
        if args.run:
            code, seconds, peak, log = run_measured(
                [sys.executable, "-m", "edgegen", "run", str(out), "-p", "Hello", "-n", "8", "--stats"])
            print(log.strip())
            if code:
                sys.exit(f"run failed ({code})")
            print(f"{args.preset} {args.quant} run (8 tokens): peak RSS {peak / GIB:.2f} GiB, {seconds:.1f} s")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Per-layer-embedding rows that are not in memory: gathered as they are touched vs prefetched first.

    python benchmarks/ple_cold.py --bundle BUNDLE [--rows 128] [--rounds 8]

A bundle's per-layer-embedding table (E2B: 1.1 GiB of int4 rows + 0.3 GiB of scales) is memory-mapped and
read a few rows a call (runtime/model.py PLETable). Rows the page cache does not hold are read from disk
when touched. Each round here drops the table's files from the page cache (posix_fadvise DONTNEED: clean
pages nobody maps; the bundle is opened after it), then times PLETable on `--rows` fresh random ids twice,
once with `osinfo.prefetch_rows` switched off and once with it on, in alternating order, dropping the
cache between the two. Medians and their ratio are printed. Linux/POSIX only (posix_fadvise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_gather(bundle_dir: Path, ids: np.ndarray, prefetch: bool) -> float:
    """ms of one PLETable call on `ids`, the table's files dropped from the page cache first."""
    from edgegen.runtime import osinfo
    from edgegen.runtime.manifest import load_manifest
    from edgegen.runtime.model import PLETable

    spec = load_manifest(bundle_dir).model.ple
    for name in (spec.file, spec.scales_file):
        if name:
            drop_from_page_cache(bundle_dir / name)
    table = PLETable(bundle_dir, spec)
    saved = osinfo.prefetch_rows
    if not prefetch:
        osinfo.prefetch_rows = lambda rows, ids: None
    try:
        t = time.perf_counter()
        table(ids.reshape(1, -1))
        return 1000 * (time.perf_counter() - t)
    finally:
        osinfo.prefetch_rows = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=128, help="ids per call (a prompt chunk; 5: a verify call)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not hasattr(os, "posix_fadvise"):
        sys.exit("error: this benchmark drops files from the page cache with posix_fadvise (Linux/POSIX)")
    from edgegen.runtime.manifest import load_manifest

    m = load_manifest(args.bundle)
    if m.model.ple is None:
        sys.exit(f"error: {args.bundle} has no per-layer-embedding table")
    rng = np.random.default_rng(args.seed)
    times = {False: [], True: []}
    for r in range(args.rounds):
        for prefetch in ((False, True) if r % 2 == 0 else (True, False)):
            ids = rng.integers(0, m.model.vocab_size, args.rows)
            times[prefetch].append(timed_gather(args.bundle, ids, prefetch))
        print(f"round {r + 1}: touched {times[False][-1]:.1f} ms, prefetched {times[True][-1]:.1f} ms", flush=True)
    plain, pre = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.rows} rows not in memory, medians of {args.rounds}: gathered as touched {plain:.1f} ms, "
          f"prefetched {pre:.1f} ms ({pre / plain:.2f}x); load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""What decides decode speed on the CPU: bundles x session policies, interleaved, as ratios to a baseline.

    python benchmarks/speed_sweep.py                         # e2b-slice: int4 int8-compute block 32/64/128,
                                                             # exact compute; spin policies
    python benchmarks/speed_sweep.py --bundle B [--bundle B2] --policies nospin,spin-stop --context 128
    python benchmarks/speed_sweep.py --bundle B --global-pool  # one process-wide intra-op pool (own process)
    python benchmarks/speed_sweep.py --bundle B --prefill 512,2048   # time to first token too

Every configuration (bundle, policy) is opened once; then, `--repeats` times in turn, each one measures at
`--context` positions: a one-token target call (decode), a (k+1)-token call (verify), a fused k-step draft
round, and a "round" (verify then draft round back to back, as the speculative loop alternates the two
sessions: this is where one session's spinning threads slow the other); `--kinds chunk` adds a 128-row
prompt chunk (the most one prefill call writes into E2B's ring buffers). Medians over the repeats are
printed with their ratio to the first configuration, measured in the same run; `uptime` is printed before
and after because the machine may be shared.

Policies (runtime/model.py `session_options` sets the one edgegen uses: spin-stop, or nospin with --no-spin):
- nospin: intra-op threads sleep when idle (`session.intra_op.allow_spinning=0`);
- spin: they spin (onnxruntime's default): fast handoffs, but an idle session's pool keeps spinning while
  the other session runs;
- spin-stop: they spin during a run and stop when it returns (`session.force_spinning_stop=1`);
- nospin-dyn4, spin-stop-dyn4: as nospin / spin-stop, with `session.dynamic_block_base=4` (parallel loops
  handed out in shrinking blocks, so a preempted thread delays a call less);
- --global-pool: all sessions share one process-wide pool (`set_global_thread_pool_sizes`,
  `use_per_session_threads=False`); set once per process, so it is its own run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from context_scaling import REPO  # noqa: E402

POLICIES = {
    "nospin": {"session.intra_op.allow_spinning": "0"},
    "spin": {"session.intra_op.allow_spinning": "1"},
    "spin-stop": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
    # As spin-stop, with each spell of spinning bounded (onnxruntime's spin_duration_us): less CPU burnt
    # when another process wants the cores.
    "spin-stop-1ms": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1",
                      "session.intra_op.spin_duration_us": "1000"},
    "spin-stop-200us": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1",
                        "session.intra_op.spin_duration_us": "200"},
    # Parallel loops cut into shrinking blocks that threads take in turn (onnxruntime's dynamic block base),
    # instead of one share per thread: a thread the OS preempts holds up less of each call.
    "nospin-dyn4": {"session.intra_op.allow_spinning": "0", "session.dynamic_block_base": "4"},
    "spin-stop-dyn4": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1",
                       "session.dynamic_block_base": "4"},
}


def slice_bundle(compute: str, block: int, max_context: int = 4160) -> Path:
    """The e2b-slice pair exported int4 with this compute and block size (cached under build/bench)."""
    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.export.testing import save_pair

    pair = REPO / "build" / "bench" / "pair-e2b-slice"
    if not (pair / "assistant" / "config.json").is_file():
        save_pair(pair, "e2b-slice")
    out = REPO / "build" / "bench" / f"bundle-e2b-slice-int4-{compute}-b{block}-{max_context}"
    if not (out / "manifest.json").is_file():
        export_bundle(str(pair / "target"), str(pair / "assistant"), out,
                      ExportOptions(quant="int4", block_size=block, max_context=max_context, verify=False,
                                    force=True, compute=compute))
    return out


def bundle_with(path: Path, threads: int, tweak, spin: bool = False):
    """A Bundle whose sessions are opened with edgegen's own session options (`spin`: its thread policy;
    off here so that a tweak's policy starts from sleeping threads), then `tweak(options)`."""
    from edgegen.runtime import model

    base = model.session_options
    ort.set_default_logger_severity(3)  # overwritten config entries are logged as warnings

    def options(t, policy_spin):
        so = base(t, policy_spin)
        tweak(so)
        return so

    model.session_options = options
    try:
        return model.Bundle(path, threads=threads, hashes="never", spin=spin)
    finally:
        model.session_options = base


def open_bundle(path: Path, threads: int, policy: str, global_pool: bool):
    """A Bundle whose sessions carry `policy` (session config entries overridden)."""

    def tweak(so):
        for key, value in POLICIES[policy].items():
            so.add_session_config_entry(key, value)
        if global_pool:
            so.use_per_session_threads = False

    return bundle_with(path, threads, tweak)


class Probe:
    """One configuration's calls at a fixed context; each call leaves the cache at that context."""

    def __init__(self, bundle, context: int, k: int, rng):
        self.bundle, self.context, self.k, self.rng = bundle, context, k, rng
        self.cache = bundle.new_cache()
        self.vocab = bundle.manifest.model.vocab_size
        while self.cache.length < context:
            bundle.target.forward(self.cache, rng.integers(4, self.vocab, min(512, context - self.cache.length)))
        _, hidden = bundle.target.forward(self.cache, [7])
        self.hidden = hidden[-1]
        self.cache.trim(context)

    def target(self, n: int, logits: int | None = None) -> float:
        """One call of n new rows keeping `logits` rows of logits (default n: a verify call; 1: a prompt chunk)."""
        ids = self.rng.integers(4, self.vocab, n)
        t = time.perf_counter()
        self.bundle.target.forward(self.cache, ids, logits_to_keep=logits or n)
        dt = time.perf_counter() - t
        self.cache.trim(self.context)
        return dt

    def draft(self) -> float:
        t = time.perf_counter()
        self.bundle.draft_round.run_round(self.cache, 7, self.hidden)
        return time.perf_counter() - t

    def round(self) -> float:
        t = time.perf_counter()
        self.target(self.k + 1)
        self.draft()
        return time.perf_counter() - t


def prefill_ms(bundle, n: int, rng) -> float:
    """Time to first token for an n-token prompt: the whole prompt through Target.forward, last logits."""
    cache = bundle.new_cache()
    ids = rng.integers(4, bundle.manifest.model.vocab_size, n)
    t = time.perf_counter()
    bundle.target.forward(cache, ids)
    return 1000 * (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, action="append", help="bundle(s) to compare [default: e2b-slice set]")
    ap.add_argument("--policies", default="nospin,spin,spin-stop")
    ap.add_argument("--global-pool", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--prefill", default="", help="prompt lengths for time to first token, e.g. 512,2048")
    ap.add_argument("--kinds", default="decode,verify,draft,round",
                    help="calls to time: decode, verify, draft, round, chunk (a 128-row prompt chunk)")
    args = ap.parse_args()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    ort.set_default_logger_severity(3)  # overriding edgegen's own spinning entry logs a warning per session
    if args.global_pool:
        ort.set_global_thread_pool_sizes(args.threads, 1)
    bundles = args.bundle or [slice_bundle("int8", 32), slice_bundle("int8", 64), slice_bundle("int8", 128),
                              slice_bundle("exact", 32)]
    policies = args.policies.split(",")
    rng = np.random.default_rng(0)
    configs = []
    for path in bundles:
        for policy in policies:
            b = open_bundle(path, args.threads, policy, args.global_pool)
            label = f"{path.name} {policy}{' global-pool' if args.global_pool else ''}"
            configs.append((label, b, Probe(b, args.context, args.draft_tokens, rng)))
    k = args.draft_tokens
    kinds = {"decode": lambda p: p.target(1), f"verify{k + 1}": lambda p: p.target(k + 1),
             f"draft{k}": lambda p: p.draft(), "round": lambda p: p.round(),
             "chunk128": lambda p: p.target(128, logits=1)}
    wanted = args.kinds.split(",")
    kinds = {kind: fn for kind, fn in kinds.items() if kind.rstrip("0123456789") in wanted}
    times = {(label, kind): [] for label, _, _ in configs for kind in kinds}
    for fn in kinds.values():  # warm-up
        for _, _, probe in configs:
            fn(probe)
    for _ in range(args.repeats):
        for label, _, probe in configs:
            for kind, fn in kinds.items():
                times[(label, kind)].append(fn(probe))
    base = configs[0][0]
    print(f"context {args.context}, {args.threads} threads, k={k}, median of {args.repeats} interleaved; "
          f"ratios against '{base}'; [fastest call, its ratio]: on a shared machine the least disturbed")
    for label, _, _ in configs:
        cells = []
        for kind in kinds:
            ms = 1000 * statistics.median(times[(label, kind)])
            ratio = ms / (1000 * statistics.median(times[(base, kind)]))
            fastest = min(times[(label, kind)])
            cells.append(f"{kind} {ms:7.1f} ms ({ratio:.2f}x) "
                         f"[{1000 * fastest:.1f}, {fastest / min(times[(base, kind)]):.2f}x]")
        print(f"{label:55s} " + "  ".join(cells))
    for n in [int(x) for x in args.prefill.split(",") if x]:
        runs = {label: [] for label, _, _ in configs}
        for _ in range(3):  # interleaved, like the calls above
            for label, bundle, _ in configs:
                runs[label].append(prefill_ms(bundle, n, rng))
        for label, ms in runs.items():
            print(f"time to first token, {n}-token prompt, {label}: {statistics.median(ms):.0f} ms "
                  f"(runs {', '.join(f'{r:.0f}' for r in ms)}; {min(ms) / min(runs[base]):.2f}x the first's fastest)")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()

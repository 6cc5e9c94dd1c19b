"""Speculative decoding at full E2B cost with a trained drafter's acceptance: plain vs k=4 vs auto, replayed.

    python benchmarks/spec_e2b.py --bundle E2B_BUNDLE [--contexts 128,8192] [--new-tokens 128] [--repeats 2]
    python benchmarks/spec_e2b.py --bundle E2B_BUNDLE --contexts 128 --prompts heldout:6   # held-out code windows

E2B_BUNDLE: the full-size stand-in (`edgegen.export.testing.realsize_pair("e2b")`, cached under
~/.cache/edgegen/presets/e2b) exported with a 4-step draft round, as measured here:
`edgegen export --target <e2b>/target --assistant <e2b>/assistant --out E2B_BUNDLE --quant int4
--compute int8 --max-context 8448`.

Why a replay: the full-size E2B stand-in (benchmarks/realsize_export.py) has random weights, so its drafter
almost never agrees with its target; the bundled demo pair (models/demo) is trained but tiny. This script
takes the acceptance from the demo pair and the cost from the E2B bundle:

1. Acceptance oracle (demo pair, in a child process so that its memory is not in the E2B figures). For each
   prompt the demo target decodes `--new-tokens` greedily; then, at every position P of that output, the
   demo's fused 4-step draft round runs from the loop's state there (cache of P positions, the pending token,
   the target's hidden state at P-1) and a(P) = how many of its drafts match the target's greedy tokens. Under
   greedy decoding this is exactly what a round starting at P accepts with k drafts: min(a(P), k). The oracle
   is checked against the real loop: the demo Generator is run with k=4 and with `auto`, each round's
   (k, accepted) is recorded, and the oracle's prediction for those rounds is compared.
2. Replay (E2B bundle, opened once in this process). The runtime's own loop (TokenLoop._round in runtime/loop.py,
   unchanged) runs on the E2B bundle: the real policy (fixed k=4, or `auto` fed E2B timings), the real fused draft round
   (draft_round graph) or assistant steps, the real (k+1)-token verify call, the real greedy comparison, the
   real cache rollback (KVCache.trim) and all per-round host work. One thing is substituted: the number of
   drafts accepted is replaced by the oracle's min(a(P), k) for the demo prompt being replayed (the real
   comparison still runs, so its cost is paid). This is done by wrapping `accept_greedy` in the loop
   module for the duration of a replayed run; EOS ids are cleared so every run decodes `--new-tokens`.
   Plain decoding is the same Generator with the assistant off, interleaved with the speculative runs.
3. Cost ratios come from the same loop's timings (Stats): one target decode call, one (k+1)-token verify
   call, one draft round, and host time (decode time outside the two models' session calls). The memory
   roofline (bytes one decode step reads ÷ bandwidth measured here) and RSS (current while generating, and
   the process peak) are measured in the same run; bandwidth last, after RSS is read.

Tokens emitted on the E2B bundle are the random model's (meaningless text); only the cost is E2B's and only
the accept counts are the demo pair's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHOD = ("METHOD: acceptance replayed from the trained demo pair (greedy; per-position accept counts of its "
          "4-step draft round), cost measured on the E2B bundle's real graphs through the runtime's own loop. "
          "Not random-weight acceptance; nothing below is predicted.")


# -- 1. the demo pair's acceptance -----------------------------------------------------------------------
def acceptance_oracle(bundle, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """a(P) for P = len(prompt) .. len(prompt)+new_tokens-1: drafts of the fused round at P that match the
    target's greedy continuation (see the module docstring)."""
    cache = bundle.new_cache()
    logits, hidden = bundle.target.forward(cache, prompt_ids, logits_to_keep=len(prompt_ids))
    seq = list(prompt_ids) + [int(logits[-1].argmax())]
    hiddens = list(hidden)
    while len(seq) < len(prompt_ids) + new_tokens + bundle.draft_round.steps + 1:
        logits, hidden = bundle.target.forward(cache, [seq[-1]])
        seq.append(int(logits[-1].argmax()))
        hiddens.append(hidden[-1])
    # Second pass over the same calls (so the same cache contents): at each P the draft round runs from a
    # cache of P positions, then the target takes seq[P]. (Rolling one cache back from the end instead is
    # not possible: sliding-window layers keep ring buffers.)
    n = len(prompt_ids)
    accept = [0] * new_tokens
    cache = bundle.new_cache()
    bundle.target.forward(cache, prompt_ids, logits_to_keep=len(prompt_ids))
    for p in range(n, n + new_tokens):
        drafts, _ = bundle.draft_round.run_round(cache, seq[p], hiddens[p - 1])
        match = 0
        while match < len(drafts) and drafts[match] == seq[p + 1 + match]:
            match += 1
        accept[p - n] = match
        bundle.target.forward(cache, [seq[p]])
    return accept


def record_rounds(gen, prompt_ids: list[int], new_tokens: int, draft_tokens) -> list[tuple[int, int]]:
    """The real loop on the demo pair; each round's (k, accepted), read through the policy's update call."""
    rounds: list[tuple[int, int]] = []
    from edgegen.runtime.sampling import Sampling

    policy = gen._policy(draft_tokens, Sampling(), True)  # greedy, with the assistant
    real_update = policy.update

    def update(k, accepted, draft_s, verify_s):
        rounds.append((k, accepted))
        real_update(k, accepted, draft_s, verify_s)

    policy.update = update
    gen._policy = lambda *_args: policy  # the same policy object the loop would have built
    try:
        gen.reset()
        for _ in gen.stream_ids(prompt_ids, new_tokens, draft_tokens=draft_tokens):
            pass
    finally:
        del gen._policy
        policy.update = real_update
    return rounds


def oracle_agreement(accept: list[int], rounds: list[tuple[int, int]]) -> tuple[int, int]:
    """(rounds the oracle predicts exactly, rounds with drafts), walking the recorded rounds' positions."""
    pos = agree = total = 0
    for k, m in rounds:
        if k:
            total += 1
            agree += int(pos < len(accept) and min(accept[pos], k) == m)
        pos += m + 1
    return agree, total


def demo_prompts(which: str, tokenizer) -> list[tuple[str | None, list[int]]]:
    """(text, demo token ids): `bench` = runtime/bench.py's prompts; `heldout:N` = N windows of 64 tokens of
    the demo corpus's held-out split (benchmarks/demo_acceptance.py, seed 0; no text, the ids are the prompt)."""
    if which == "bench":
        from edgegen.runtime.bench import BENCH_PROMPTS

        return [(t, tokenizer.encode(t)) for t in BENCH_PROMPTS]
    from demo_acceptance import heldout_prompts

    return [(None, ids) for ids in heldout_prompts(int(which.split(":")[1]), 64, 0)]


def record_demo(new_tokens: int, threads: int | None, which: str) -> dict:
    from edgegen.demo import demo_bundle
    from edgegen.runtime.generate import Generator

    gen = Generator(demo_bundle(), threads=threads, draft_tokens=4)
    gen.eos_ids = set()  # the E2B replay decodes new_tokens per prompt; the recording covers them all
    out = []
    for text, ids in demo_prompts(which, gen.tokenizer):
        accept = acceptance_oracle(gen.bundle, ids, new_tokens)
        fixed = record_rounds(gen, ids, new_tokens, 4)
        gen._auto = None  # each prompt's auto run starts unmeasured, like a fresh Generator
        auto = record_rounds(gen, ids, new_tokens, "auto")
        out.append({"prompt": text, "prompt_tokens": len(ids), "accept": accept,
                    "rounds_k4": fixed, "rounds_auto": auto,
                    "oracle_agrees_k4": oracle_agreement(accept, fixed),
                    "oracle_agrees_auto": oracle_agreement(accept, auto)})
    return {"bundle": str(gen.bundle.path), "new_tokens": new_tokens, "prompt_set": which, "prompts": out}


# -- 2. the replay on the E2B bundle -----------------------------------------------------------------------
class ReplayedAcceptance:
    """Wraps loop.accept_greedy (runtime/loop.py): the real comparison runs (its cost is paid), then the
    accepted count is replaced by the oracle's for the round's position. Position = rounds' emitted tokens so far."""

    def __init__(self, accept: list[int]):
        self.accept, self.pos = accept, 0

    def __enter__(self):
        import edgegen.runtime.loop as loop

        self._module, self._real = loop, loop.accept_greedy
        loop.accept_greedy = self._accept
        return self

    def __exit__(self, *exc):
        self._module.accept_greedy = self._real

    def _accept(self, drafts, logits):
        m, nxt = self._real(drafts, logits)
        if drafts:
            m = min(self.accept[self.pos], len(drafts)) if self.pos < len(self.accept) else 0
        self.pos += m + 1
        return m, nxt


def current_rss_mb() -> float | None:
    """Resident memory now (Linux /proc); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def fill_to(gen, prompt: list[int], chunk: int = 512) -> None:
    """Prefill `prompt` in chunks (the Generator reuses the cached prefix), so the prefill's activations for
    8K tokens at once do not set the peak RSS; decoding afterwards reuses all but the last token."""
    done = _common_prefix(gen.processed, prompt)
    for end in range(done + chunk, len(prompt), chunk):
        gen.generate(prompt[:end], max_new_tokens=1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run_mode(gen, prompt: list[int], new_tokens: int, mode: str, accept: list[int]) -> dict:
    fill_to(gen, prompt)
    use, k = (False, 0) if mode == "plain" else (True, 4 if mode == "k4" else "auto")
    rss = []
    t0 = time.perf_counter()
    with ReplayedAcceptance(accept):
        last = None
        for i, ev in enumerate(gen.stream_ids(prompt, new_tokens, use_assistant=use, draft_tokens=k)):
            last = ev.stats
            if i % 16 == 8:
                rss.append(current_rss_mb())
    total = time.perf_counter() - t0
    s = last
    decode = total - s.time_to_first_token_s
    target = s.target_s - s.prefill_s
    rounds = max(s.target_calls, 1)
    return {"mode": mode, "tokens": s.new_tokens - 1, "decode_s": decode,
            "ms_per_token": 1e3 * decode / (s.new_tokens - 1),
            "target_calls": s.target_calls, "tokens_per_call": (s.new_tokens - 1) / rounds,
            "target_ms_per_call": 1e3 * target / rounds,
            "draft_ms_per_round": 1e3 * s.draft_s / max(s.drafted_by_position[:1] or [1]),
            "host_share": max(decode - target - s.draft_s, 0.0) / decode,
            "k_used": s.drafted / max(s.target_calls, 1), "drafting": s.drafting,
            "rss_mb": max((r for r in rss if r), default=None)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=False, help="the E2B bundle (int4, with a 4-step draft round)")
    ap.add_argument("--contexts", default="128,8192")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-spin", action="store_true", help="idle threads sleep (edgegen run --no-spin)")
    ap.add_argument("--modes", default="plain,k4,auto")
    ap.add_argument("--prompts", default="bench", help="demo prompts: bench (runtime/bench.py's 4) or heldout:N")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--record-only", type=Path, help=argparse.SUPPRESS)  # the child process: write the oracle
    args = ap.parse_args()

    if args.record_only:
        args.record_only.write_text(json.dumps(record_demo(args.new_tokens, args.threads, args.prompts)) + "\n")
        return 0
    if args.bundle is None:
        ap.error("--bundle is required")

    # 1. the oracle, in a child process (its memory and sessions are not this process's)
    rec_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"spec_e2b_oracle_{os.getpid()}.json"
    subprocess.run([sys.executable, __file__, "--record-only", str(rec_path), "--new-tokens",
                    str(args.new_tokens), "--threads", str(args.threads), "--prompts", args.prompts], check=True)
    rec = json.loads(rec_path.read_text())
    rec_path.unlink()

    print(METHOD)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; uptime: "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"demo pair {rec['bundle']}: {len(rec['prompts'])} {args.prompts} prompts x {args.new_tokens} greedy tokens")
    for i, p in enumerate(rec["prompts"]):
        k4 = p["rounds_k4"]
        auto = p["rounds_auto"]
        tpc = lambda rs: (sum(m + 1 for _, m in rs)) / len(rs)  # noqa: E731
        a4, n4 = p["oracle_agrees_k4"]
        aa, na = p["oracle_agrees_auto"]
        print(f"  prompt {i}: real demo loop k=4 {tpc(k4):.2f} tok/call ({len(k4)} rounds), auto {tpc(auto):.2f} "
              f"tok/call; oracle reproduces {a4}/{n4} k=4 rounds, {aa}/{na} auto drafting rounds")

    all_k4 = [r for p in rec["prompts"] for r in p["rounds_k4"]]
    agree = [sum(p[f"oracle_agrees_{m}"][j] for p in rec["prompts"]) for m in ("k4", "auto") for j in (0, 1)]
    print(f"  all prompts: real demo loop k=4 {sum(m + 1 for _, m in all_k4) / len(all_k4):.2f} tok/call; oracle "
          f"reproduces {agree[0]}/{agree[1]} k=4 rounds and {agree[2]}/{agree[3]} auto drafting rounds exactly")

    from e2b_roofline import bandwidth_gbs, step_bytes

    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle
    from edgegen.runtime.osinfo import peak_rss_mb

    bundle = Bundle(args.bundle, threads=args.threads, spin=not args.no_spin)  # opened once in this process
    if bundle.draft_round is None or bundle.draft_round.steps != 4:
        print("the bundle needs a 4-step draft_round graph", file=sys.stderr)
        return 2
    gen = Generator(bundle, draft_tokens=4)
    gen.eos_ids = set()  # random weights: run every replay to --new-tokens
    kv_bytes = gen.cache.nbytes
    disk = sum(f.stat().st_size for f in Path(args.bundle).iterdir() if f.is_file())
    tok = gen.tokenizer
    vocab = bundle.manifest.model.vocab_size
    contexts = [int(c) for c in args.contexts.split(",")]
    filler = [int(t) for t in np.random.default_rng(0).integers(4, vocab, max(contexts))]
    # The E2B prompt's content does not matter (random weights), its length does: the bench text in E2B's
    # tokenizer (none for held-out windows) after random filler up to the context.
    prompts = [tok.encode(p["prompt"]) if p["prompt"] else [] for p in rec["prompts"]]
    modes = args.modes.split(",")
    warm = prompts[0] or filler[:16]
    gen.generate(warm, max_new_tokens=4)  # warm-up: first calls pay one-time allocations
    gen.generate(warm, max_new_tokens=4, draft_tokens=4)

    results = {}
    for ctx in contexts:
        gen.reset()
        gen._auto = None  # auto learns costs at this context from scratch
        rows = {m: [] for m in modes}
        for rep in range(args.repeats):
            for i, p in enumerate(rec["prompts"]):
                ids = prompts[i]
                prompt = filler[:max(ctx - len(ids), 0)] + ids
                order = modes[rep % len(modes):] + modes[:rep % len(modes)]  # rotate which mode goes first
                for mode in order:
                    r = run_mode(gen, prompt, args.new_tokens, mode, p["accept"])
                    r.update(prompt=i, repeat=rep)
                    rows[mode].append(r)
                    print(f"  ctx {ctx} rep {rep} prompt {i} {mode:5s}: {r['ms_per_token']:7.1f} ms/token, "
                          f"{r['tokens_per_call']:.2f} tok/call, RSS {r['rss_mb'] or 0:.0f} MiB", flush=True)
        results[ctx] = rows

    peak = peak_rss_mb()
    bw = bandwidth_gbs(args.threads)  # after the RSS reading: its 256 MB matrix is not the runtime's memory
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    def per_repeat(rs):
        """{repeat: (ms/token over all prompts, tokens per target call over all prompts)}"""
        out = {}
        for rep in sorted({r["repeat"] for r in rs}):
            mine = [r for r in rs if r["repeat"] == rep]
            tokens = sum(r["tokens"] for r in mine)
            out[rep] = (1e3 * sum(r["decode_s"] for r in mine) / tokens, tokens / sum(r["target_calls"] for r in mine))
        return out

    print()
    print(METHOD)
    print(f"E2B bundle {args.bundle} ({disk / 2**30:.2f} GiB on disk; KV cache {kv_bytes / 2**30:.2f} GiB for "
          f"{gen.cache.max_context} positions); memory bandwidth (fp32 GEMV) {bw:.1f} GB/s; uptime after: {uptime}")
    print(f"ms/token: all {len(prompts)} prompts' decode time / tokens, median of {args.repeats} interleaved "
          "repeats; speedup: plain / mode within each repeat, median; per-call costs: medians over runs")
    summary = {}
    for ctx, rows in results.items():
        weights, kv = step_bytes(bundle, ctx)
        roof = (weights + kv) / bw / 1e6
        plain = per_repeat(rows["plain"]) if "plain" in rows else None
        decode_call = med(rows["plain"], "target_ms_per_call") if plain else None
        print(f"context {ctx}: roofline {roof:.1f} ms/token ({weights / 1e6:.0f} MB weights + {kv / 1e6:.1f} MB K/V)")
        summary[ctx] = {"roofline_ms": roof, "bytes": {"weights": weights, "kv": kv}}
        for mode, rs in rows.items():
            reps = per_repeat(rs)
            ms = statistics.median(v[0] for v in reps.values())
            tpc = statistics.median(v[1] for v in reps.values())
            rss = max(r["rss_mb"] or 0 for r in rs)
            line = (f"  {mode:5s}: {ms:6.1f} ms/token ({1e3 / ms:5.2f} tok/s), {tpc:.2f} tok/call, "
                    f"host {100 * med(rs, 'host_share'):.1f}%, RSS while generating <= {rss:.0f} MiB")
            entry = {"ms_per_token": ms, "tokens_per_call": tpc, "host_share": med(rs, "host_share"),
                     "rss_mb": rss, "runs": rs}
            if mode == "plain":
                line += f"; {ms / roof:.2f}x roofline"
                entry["vs_roofline"] = ms / roof
            elif plain:
                speedup = statistics.median(plain[rep][0] / reps[rep][0] for rep in reps)
                verify = med(rs, "target_ms_per_call")
                what = "verify call" if mode == "k4" else "target call (k varies)"
                line += f"; speedup {speedup:.2f}x; {what} {verify:.1f} ms = {verify / decode_call:.2f}x decode"
                entry.update(speedup=speedup, verify_ms=verify, decode_ms=decode_call,
                             verify_over_decode=verify / decode_call)
                if mode == "k4":
                    draft = med(rs, "draft_ms_per_round")
                    line += f", 4-step draft round {draft:.1f} ms = {draft / decode_call:.2f}x decode"
                    entry.update(draft_ms=draft, draft_over_decode=draft / decode_call)
                else:
                    line += f", mean drafts per round {med(rs, 'k_used'):.2f}"
            summary[ctx][mode] = entry
            print(line)
    goal = disk + kv_bytes + 2**30
    print(f"peak RSS {peak:.0f} MiB vs goal bundle + KV + 1 GiB = {goal / 2**20:.0f} MiB "
          f"(bundle opened once in this process; the demo recording ran in a child process)")
    if args.json:
        args.json.write_text(json.dumps({"method": METHOD, "oracle": rec, "results": summary, "peak_rss_mb": peak,
                                         "goal_mb": goal / 2**20, "bandwidth_gbs": bw, "uptime": uptime,
                                         "disk_bytes": disk, "kv_bytes": kv_bytes}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

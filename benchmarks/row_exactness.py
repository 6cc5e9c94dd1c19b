"""Does row r of an S-row onnxruntime call compute bit-for-bit what a call on that row alone computes?

    python benchmarks/row_exactness.py ops [--threads 1,2] [--quick] [--vocab 262144]
    python benchmarks/row_exactness.py e2e [--threads 2] [--tokens 64] [--generator]
    python benchmarks/row_exactness.py costs [--threads 2] [--contexts 64,900]

Greedy speculative decoding promises the output of plain greedy decoding, token for token. That holds
only if the target computes each position's logits (and K/V rows) identically whether the position is
the single row of a decode call (S=1) or one of the k+1 rows of a verify call. `ops` checks each op the
target graph uses in isolation, at E2B shapes, with random weights at HF's init scale: row r of an S-row
call against the same row computed alone (S=1) and against the same row computed in a 2-row call next to
an unrelated row ("pad": the decode-as-two-rows formulation). `e2e` builds the e2b-slice target graph and
checks greedy speculative (k=1,2,4) against plain decoding over many tokens, with decode as it is today
(S=1) and padded to two rows, and times both. `costs` times the variants' target calls side by side.

What it showed on onnxruntime 1.32 (x86-64, AVX-512):
- row-wise ops (RMSNormalization, ReduceMean/Pow norm, Softmax, Tanh softcap, Gelu) and fp32 MatMul with a
  weight initializer: row-exact.
- MatMulNBits, accuracy_level 4 (int8 compute), block 32: row-exact at every S, S=1 included. Blocks 64/128
  (int4) are not: rows left over after the kernel's multi-row tiles are summed differently.
- MatMulNBits, accuracy_level 0/1/2 (fp32 compute): one row takes another path than several; calls of
  two or more rows agree (hence Target.min_rows = 2, at ~3x the cost of a one-row decode).
- GroupQueryAttention: one row differs from several; padded to two rows it still differs once the key
  count crosses MLAS's blocking steps (T = 64) or the sliding window.
- Standard-op attention: q.k^T over d = 256/512 is blocked by MLAS according to the key count T (and a
  thread's share of it), so it is not row-exact; with the scores in 128-wide head-dim chunks and sliding
  layers reading keys from a 128-aligned start (Profile.row_exact, export/row_exact.py) it is, at 1-8
  threads, and then a one-row decode needs no padding.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgegen.export.graphs import PROFILES, LayerPlan, _scatter_rows, _standard_attention  # noqa: E402
from edgegen.export.onnx_graph import Graph, WeightFile  # noqa: E402
from edgegen.export.quantize import Linears, Quant  # noqa: E402

F32, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
SIZES = (2, 5, 8, 17)
HIDDEN, MLP, MLP_WIDE, HEADS, KV_HEADS, HEAD_DIM, FULL_HEAD_DIM, WINDOW = 1536, 6144, 12288, 8, 1, 256, 512, 512
INIT_STD = 0.02  # HF's initializer_range for Gemma 4


ROW_EXACT = dataclasses.replace(PROFILES["cpu"], standard_attention=True, row_exact=True)


def _session(build, threads: int, tmp: Path, name: str, options: dict | None = None,
             profile=PROFILES["cpu"]) -> ort.InferenceSession:
    """Save the graph `build(g)` fills and open it the way the runtime does (runtime/model.py)."""
    from edgegen.runtime.model import session_options

    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    shared = WeightFile(out / "shared.weights")
    g = Graph(name, out, shared, profile=profile)
    build(g)
    g.save(out)
    g.data.close()
    shared.close()
    so = session_options(threads)
    for k, v in (options or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(out / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])


# -- row-wise ops (no state): compare row r of an S-row call with the row alone and in a 2-row call ----------


def compare_rows(run, rows: np.ndarray) -> dict:
    """rows [Smax, ...]: run(x [S, ...]) -> [S, ...]. Returns per-S (max |d| vs alone, max |d| vs pad)."""
    alone = np.stack([run(rows[r:r + 1])[0] for r in range(len(rows))])
    rng = np.random.default_rng(7)
    dummy = rows[rng.permutation(len(rows))[:1]] * np.float32(0.5)
    padded = np.stack([run(np.concatenate([rows[r:r + 1], dummy]))[0] for r in range(len(rows))])
    out = {"pad_vs_alone": float(np.abs(padded - alone).max())}
    for s in SIZES:
        got = run(rows[:s])
        out[s] = (float(np.abs(got - alone[:s]).max()), float(np.abs(got - padded[:s]).max()))
    return out


def linear_case(k: int, n: int, quant: Quant | None, threads: int, tmp: Path, w: np.ndarray):
    """y = x W^T through the project's Linears (quant None: fp32 MatMul with a [K, N] initializer)."""
    def build(g):
        x = g.input("x", F32, [1, "S", k])
        y = Linears(g, quant or Quant("fp32"))(x, "w", w)
        g.output(y, "y", F32, [1, "S", n])
    tag = "fp32" if quant is None else f"{quant.kind}_b{quant.block_size}_l{quant.accuracy_level}"
    sess = _session(build, threads, tmp, f"lin_{k}_{n}_{tag}_t{threads}")
    return lambda x: sess.run(None, {"x": x[None]})[0][0]


def rowwise_case(kind: str, width: int, threads: int, tmp: Path):
    def build(g):
        x = g.input("x", F32, [1, "S", width])
        if kind == "RMSNormalization":
            w = (1 + 0.2 * np.random.default_rng(3).standard_normal(width)).astype(np.float32)
            y = g.op("RMSNormalization", x, g.weight("w", w), axis=-1, epsilon=1e-6)
        elif kind == "rms_noscale":  # ReduceMean/Pow (ORT may fuse it into SimplifiedLayerNormalization)
            ms = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1]), keepdims=1)
            y = g.op("Mul", x, g.op("Pow", g.op("Add", ms, g.const(np.float32(1e-6), np.float32)),
                                    g.const(np.float32(-0.5), np.float32)))
        elif kind == "Softmax":
            y = g.op("Softmax", x, axis=-1)
        elif kind == "softcap":
            c = g.const(np.float32(30.0), np.float32)
            y = g.op("Mul", g.op("Tanh", g.op("Div", x, c)), c)
        elif kind == "Gelu_tanh":
            y = g.op("Gelu", x, approximate="tanh")
        g.output(y, "y", F32, [1, "S", width])
    sess = _session(build, threads, tmp, f"row_{kind}_{width}_t{threads}")
    return lambda x: sess.run(None, {"x": x[None]})[0][0]


def window_bias(g: Graph, positions: str, total: str, window: int) -> str:
    """Additive attention bias [1, 1, S, T] for GroupQueryAttention without a local window: 0 where key j
    is visible from query position p (j <= p, and j > p - window when window > 0), else -inf."""
    t = g.op("Cast", total, to=I64)
    p = g.op("Reshape", positions, g.const([1, 1, -1, 1]))
    j = g.op("Reshape", g.op("Range", g.const(0), t, g.const(1)), g.const([1, 1, 1, -1]))
    seen = g.op("LessOrEqual", j, p)
    if window:
        seen = g.op("And", seen, g.op("Greater", j, g.op("Sub", p, g.const(window))))
    return g.op("Where", seen, g.const(np.float32(0), np.float32), g.const(np.float32(-np.inf), np.float32))


# -- attention: state in an in-place K/V buffer, as the runtime binds it -------------------------------------------


class AttentionCase:
    """One attention layer over a preallocated [1, kv, max_ctx, d] buffer bound as past and present."""

    def __init__(self, kind: str, head_dim: int, sliding: bool, threads: int, tmp: Path, max_ctx: int = 1024):
        self.d, self.max_ctx, self.kind = head_dim, max_ctx, kind
        window = WINDOW if sliding else -1
        layer = LayerPlan(0, "sliding_attention" if sliding else "full_attention", head_dim, KV_HEADS, False, 0)
        width, kvw = HEADS * head_dim, KV_HEADS * head_dim

        def build(g):
            q = g.input("q", F32, [1, "S", width])
            k = g.input("k", F32, [1, "S", kvw])
            v = g.input("v", F32, [1, "S", kvw])
            g.input("position_ids", I64, [1, "S"])
            g.input("seqlens_k", I32, [1])
            g.input("total_sequence_length", I32, [])
            shape = [1, KV_HEADS, "max_context", head_dim]
            g.input("past_key", F32, shape)
            g.input("past_value", F32, shape)
            if kind == "gqa":
                out = g.ms("GroupQueryAttention", q, k, v, "past_key", "past_value", "seqlens_k",
                           "total_sequence_length", out=["out", "present_key", "present_value"], num_heads=HEADS,
                           kv_num_heads=KV_HEADS, scale=1.0, local_window_size=window)[0]
            elif kind == "gqa_bias":  # no local window: the window is an additive mask, GQA spans [0, T)
                bias = window_bias(g, "position_ids", "total_sequence_length", WINDOW if sliding else 0)
                out = g.ms("GroupQueryAttention", q, k, v, "past_key", "past_value", "seqlens_k",
                           "total_sequence_length", "", "", "", bias,
                           out=["out", "present_key", "present_value"], num_heads=HEADS,
                           kv_num_heads=KV_HEADS, scale=1.0, local_window_size=-1)[0]
            else:  # standard-op attention (export/graphs.py; "rowexact": its row-exact scores)
                heads4 = [g.op("Reshape", t, g.const([1, -1, n, head_dim]))
                          for t, n in ((q, HEADS), (k, KV_HEADS), (v, KV_HEADS))]
                keys = _scatter_rows(g, "past_key", heads4[1], "present_key", layer)
                values = _scatter_rows(g, "past_value", heads4[2], "present_value", layer)
                out = _standard_attention(g, heads4[0], keys, values, layer, HEADS, WINDOW, "position_ids")
            g.output(out, "attn", F32, [1, "S", width])
            for name in ("present_key", "present_value"):
                g.outputs.append(__import__("onnx").helper.make_tensor_value_info(name, F32, shape))
        profile = {"standard": PROFILES["openvino"], "rowexact": ROW_EXACT}.get(kind, PROFILES["cpu"])
        self.sess = _session(build, threads, tmp, f"{kind}_{head_dim}_{int(sliding)}_t{threads}", profile=profile)
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, KV_HEADS, max_ctx, head_dim), np.float32))
                        for _ in range(2)]

    def fill(self, k: np.ndarray, v: np.ndarray) -> None:
        """Write rows [0, P) of both buffers (the context before the positions under test)."""
        for buf, rows in zip(self.buffers, (k, v), strict=True):
            a = buf.numpy()
            a[0, 0, :len(rows)] = rows
            buf.update_inplace(a)

    def __call__(self, q, k, v, past: int) -> np.ndarray:
        s = q.shape[0]
        b = self.sess.io_binding()
        feeds = {"q": q[None], "k": k[None], "v": v[None],
                 "position_ids": np.arange(past, past + s, dtype=np.int64)[None],
                 "seqlens_k": np.array([past + s - 1], np.int32),
                 "total_sequence_length": np.array(past + s, np.int32)}
        for n, a in feeds.items():
            b.bind_cpu_input(n, np.ascontiguousarray(a))
        b.bind_ortvalue_input("past_key", self.buffers[0])
        b.bind_ortvalue_input("past_value", self.buffers[1])
        b.bind_ortvalue_output("present_key", self.buffers[0])
        b.bind_ortvalue_output("present_value", self.buffers[1])
        b.bind_output("attn")
        self.sess.run_with_iobinding(b)
        return b.get_outputs()[2].numpy()[0]


def attention_rows(case: AttentionCase, past: int, rng) -> dict:
    """Rows past..past+Smax-1: an S-row call against one call per row (S=1) and per row + a dummy (pad)."""
    smax = max(SIZES)
    ctx_k, ctx_v = (rng.standard_normal((past, case.d), dtype=np.float32) for _ in range(2))
    q = rng.standard_normal((smax, HEADS * case.d), dtype=np.float32)
    k = rng.standard_normal((smax, case.d), dtype=np.float32)
    v = rng.standard_normal((smax, case.d), dtype=np.float32)
    case.fill(ctx_k, ctx_v)
    alone = np.stack([case(q[r:r + 1], k[r:r + 1], v[r:r + 1], past + r)[0] for r in range(smax)])
    case.fill(ctx_k, ctx_v)
    dq, dk, dv = (rng.standard_normal((1, t.shape[1]), dtype=np.float32) for t in (q, k, v))
    padded = np.stack([case(np.concatenate([q[r:r + 1], dq]), np.concatenate([k[r:r + 1], dk]),
                            np.concatenate([v[r:r + 1], dv]), past + r)[0] for r in range(smax)])
    out = {"pad_vs_alone": float(np.abs(padded - alone).max())}
    for s in SIZES:
        case.fill(ctx_k, ctx_v)
        got = case(q[:s], k[:s], v[:s], past)
        out[s] = (float(np.abs(got - alone[:s]).max()), float(np.abs(got - padded[:s]).max()))
    return out


def _fmt(res: dict) -> str:
    def one(d):
        return "exact" if d == 0 else f"{d:.1e}"
    cells = [f"S={s}: {one(a)}/{one(p)}" for s, (a, p) in ((s, res[s]) for s in SIZES)]
    return "  ".join(cells) + f"  | pad vs alone {one(res['pad_vs_alone'])}"


def run_ops(args) -> None:
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="rowexact-"))
    print("row r of an S-row call vs the row alone (S=1) / vs the row in a 2-row call: max |diff| ('exact' = "
          "bit-identical)")
    shapes = [(HIDDEN, MLP_WIDE), (MLP_WIDE, HIDDEN), (HIDDEN, HEADS * FULL_HEAD_DIM)]
    if args.quick:
        shapes = shapes[:2]
    if args.vocab:
        shapes.append((HIDDEN, args.vocab))  # the tied lm_head: quantized cases only
    try:
        _ops_table(args, rng, tmp, shapes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ops_table(args, rng, tmp: Path, shapes: list[tuple[int, int]]) -> None:
    for threads in args.threads:
        print(f"\n== {threads} thread(s) ==")
        for k, n in ([] if args.only == "attention" else shapes):
            w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(INIT_STD)
            x = rng.standard_normal((max(SIZES), k), dtype=np.float32)
            head = n == args.vocab
            cases = [] if head else [("fp32 MatMul", None)]
            for bits in ("int4", "int8"):
                for level in ((0, 4) if head else (0, 1, 2, 4)):
                    for block in ((32,) if args.quick or head else (32, 64, 128)):
                        if block != 32 and level in (1, 2):
                            continue
                        cases.append((f"{bits} b{block} level {level}", Quant(bits, block, level)))
            for label, quant in cases:
                try:
                    run = linear_case(k, n, quant, threads, tmp, w)
                except Exception as exc:  # noqa: BLE001 - a configuration this build does not run
                    print(f"  [{k}->{n}] {label:22s} cannot run: {str(exc).splitlines()[0][:100]}")
                    continue
                print(f"  [{k}->{n}] {label:22s} {_fmt(compare_rows(run, x))}", flush=True)
        rowwise = ("RMSNormalization", "rms_noscale", "Softmax", "softcap", "Gelu_tanh")
        for kind in (() if args.only == "attention" else rowwise):
            width = {"Softmax": 32768, "softcap": 32768, "Gelu_tanh": MLP_WIDE}.get(kind, HIDDEN)
            x = (3 * rng.standard_normal((max(SIZES), width))).astype(np.float32)
            print(f"  {kind:18s} [{width}] {_fmt(compare_rows(rowwise_case(kind, width, threads, tmp), x))}",
                  flush=True)
        for kind in args.attention:
            for d, sliding in ((HEAD_DIM, True), (FULL_HEAD_DIM, False)):
                case = AttentionCase(kind, d, sliding, threads, tmp)
                for past in args.pasts:
                    label = f"{kind} d={d} {'sliding' if sliding else 'full'} past={past}"
                    print(f"  {label:34s} {_fmt(attention_rows(case, past, rng))}", flush=True)


# -- end to end: the e2b-slice target, greedy speculative vs plain ------------------------------------------------

VARIANTS = {  # name -> (attention, compute)
    "gqa-exact": ("gqa", "exact"), "gqa-int8": ("gqa", "int8"),
    "std-exact": ("standard", "exact"), "std-int8": ("standard", "int8"),
    "rowexact-exact": ("rowexact", "exact"), "rowexact-int8": ("rowexact", "int8"),
}


def ensure_variant(name: str, preset: str = "e2b-slice", quant: str = "int4", max_context: int = 1024) -> Path:
    """The preset pair exported with GroupQueryAttention (the cpu profile before row-exact attention), plain
    standard-op attention (the openvino profile's), or the row-exact one (today's cpu profile), with exact or
    int8 compute; cached under build/bench/."""
    from context_scaling import REPO, ensure_bundle  # the pair is shared with the other benchmarks

    from edgegen.export import graphs
    from edgegen.export.bundle import ExportOptions, export_bundle

    attention, compute = VARIANTS[name]
    pair = ensure_bundle(preset, quant, max_context).parent / f"pair-{preset}"
    bundle = REPO / "build" / "bench" / f"rowexact-{preset}-{quant}-{name}-{max_context}"
    if (bundle / "manifest.json").is_file():
        return bundle
    saved = graphs.PROFILES["cpu"]
    graphs.PROFILES["cpu"] = dataclasses.replace(saved, standard_attention=attention != "gqa",
                                                 row_exact=attention == "rowexact")
    try:
        export_bundle(str(pair / "target"), str(pair / "assistant"), bundle,
                      ExportOptions(quant=quant, max_context=max_context, verify=False, force=True, compute=compute))
    finally:
        graphs.PROFILES["cpu"] = saved
    return bundle


def plain_decode(target, cache, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    cache.reset()
    logits, _ = target.forward(cache, prompt)
    tokens, rows = [int(logits[-1].argmax())], [logits[-1].copy()]
    while len(tokens) < n:
        logits, _ = target.forward(cache, [tokens[-1]])
        tokens.append(int(logits[-1].argmax()))
        rows.append(logits[-1].copy())
    return tokens, rows


def oracle_speculative(target, cache, prompt: list[int], reference: list[int], k: int, n: int, rng):
    """Greedy speculative decoding whose drafts are the plain run's own continuation, one draft in three
    replaced by a random token: every verify row gets used, and rejections trim the cache."""
    cache.reset()
    logits, _ = target.forward(cache, prompt)
    tokens, rows = [int(logits[-1].argmax())], [logits[-1].copy()]
    vocab = logits.shape[-1]
    while len(tokens) < n:
        kk = min(k, n - len(tokens) - 1)
        drafts = [reference[i] if i < len(reference) and rng.random() > 1 / 3 else int(rng.integers(4, vocab))
                  for i in range(len(tokens), len(tokens) + kk)]
        base = cache.length
        logits, _ = target.forward(cache, [tokens[-1], *drafts], logits_to_keep=kk + 1)
        m = 0
        while m < kk and int(logits[m].argmax()) == drafts[m]:
            m += 1
        cache.trim(base + m + 1)
        tokens += drafts[:m] + [int(logits[m].argmax())]
        rows += [r.copy() for r in logits[:m + 1]]
    return tokens[:n], rows[:n]


def call_costs(target, cache, context: int, rng, vocab: int) -> tuple[float, float]:
    """ms of a 1-token and a 5-token target call at `context`."""
    cache.reset()
    target.forward(cache, [int(t) for t in rng.integers(4, vocab, context)])

    def call(n):
        def run():
            target.forward(cache, [int(t) for t in rng.integers(4, vocab, n)], logits_to_keep=n)
            cache.trim(context)
        return run
    from e2b_roofline import _median_ms  # benchmarks/ is on sys.path when this runs as a script

    return _median_ms(call(1), 15), _median_ms(call(5), 15)


def run_e2e(args) -> None:
    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle

    prompt_rng = np.random.default_rng(11)
    lengths = [int(x) for x in args.prompts.split(",")]
    for name in args.variants:
        path = ensure_variant(name)
        for threads in args.threads:
            bundle = Bundle(path, threads=threads, hashes="never")
            vocab = bundle.manifest.model.vocab_size
            prompts = [[int(t) for t in prompt_rng.integers(4, vocab, n)] for n in lengths]
            for min_rows in (1, 2):
                bundle.target.min_rows = min_rows
                cache = bundle.new_cache()
                flips, worst, gen_ok = [], 0.0, []
                for p in prompts:
                    ref, ref_rows = plain_decode(bundle.target, cache, p, args.tokens)
                    for k in (1, 2, 4):
                        got, rows = oracle_speculative(bundle.target, cache, p, ref, k, args.tokens,
                                                       np.random.default_rng(k))
                        first = next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), None)
                        flips.append(first if first is None else (len(p), k, first))
                        same_prefix = first if first is not None else len(ref)
                        if same_prefix:
                            worst = max(worst, float(np.abs(np.stack(rows[:same_prefix])
                                                            - np.stack(ref_rows[:same_prefix])).max()))
                    if args.generator:
                        gen = Generator(bundle)
                        plain = gen.generate(p, max_new_tokens=args.tokens, use_assistant=False).token_ids
                        for k in (1, 2, 4):
                            gen.reset()
                            gen_ok.append(gen.generate(p, max_new_tokens=args.tokens, draft_tokens=k).token_ids
                                          == plain)
                one, five = call_costs(bundle.target, cache, lengths[0], np.random.default_rng(3), vocab)
                equal = sum(f is None for f in flips)
                firsts = sorted(f for f in flips if f is not None)
                line = (f"{name:10s} threads {threads} decode rows {min_rows}: speculative == plain in {equal}/"
                        f"{len(flips)} (prompt x k)" + (f", first differences at {firsts}" if firsts else "")
                        + f"; max |logit diff| before any difference {worst:.1e}; decode {one:.1f} ms, "
                        f"verify-5 {five:.1f} ms")
                if gen_ok:
                    line += f"; Generator k=1,2,4 == plain: {sum(gen_ok)}/{len(gen_ok)}"
                print(line, flush=True)
            del bundle


def run_costs(args) -> None:
    """ms per target call (S=1 and S=5) per variant and context, variants interleaved so that load from
    other processes hits them alike; decode rows 2 = the S=1 call padded to two rows."""
    from edgegen.runtime.model import Bundle

    bundles = {name: Bundle(ensure_variant(name), threads=args.threads[0], hashes="never") for name in args.variants}
    rng = np.random.default_rng(5)
    for ctx in args.contexts:
        caches = {}
        for name, b in bundles.items():
            caches[name] = b.new_cache()
            b.target.forward(caches[name], [int(t) for t in rng.integers(4, b.manifest.model.vocab_size, ctx)])
        keys = [(name, n, rows) for name in bundles for n in (0, 1, 5) for rows in (1, 2) if n == 1 or rows == 1]
        times = {key: [] for key in keys}
        hidden = np.zeros(bundles[next(iter(bundles))].manifest.model.hidden_size, np.float32)
        for _ in range(args.repeats):
            for (name, n, rows), acc in times.items():
                b, cache = bundles[name], caches[name]
                b.target.min_rows = rows
                ids = [int(t) for t in rng.integers(4, b.manifest.model.vocab_size, n)]
                t = time.perf_counter()
                if n:
                    b.target.forward(cache, ids, logits_to_keep=n)
                elif b.draft_round is not None:  # n = 0: the fused draft round (4 drafter steps)
                    b.draft_round.run_round(cache, 7, hidden)
                acc.append(time.perf_counter() - t)
                cache.trim(ctx)
        for name in bundles:
            one, two, five, draft = (1000 * statistics.median(times[key]) for key in
                                     ((name, 1, 1), (name, 1, 2), (name, 5, 1), (name, 0, 1)))
            print(f"context {ctx:4d} {name:15s} threads {args.threads[0]}: decode {one:6.1f} ms, decode padded to 2 "
                  f"rows {two:6.1f} ms, verify-5 {five:6.1f} ms, draft round {draft:5.1f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ops = sub.add_parser("ops")
    ops.add_argument("--threads", default="1,2")
    ops.add_argument("--quick", action="store_true")
    ops.add_argument("--vocab", type=int, default=262144, help="lm_head width to check (0: skip)")
    ops.add_argument("--attention", default="gqa,gqa_bias,standard,rowexact")
    ops.add_argument("--pasts", default="1,20,28,40,60,100,300,700",
                     help="context lengths before the rows under test (MLAS picks its blocking from T)")
    ops.add_argument("--only", default="", help="attention: skip the linear and row-wise ops")
    e2e = sub.add_parser("e2e")
    e2e.add_argument("--threads", default="2")
    e2e.add_argument("--variants", default=",".join(VARIANTS))
    e2e.add_argument("--tokens", type=int, default=64)
    e2e.add_argument("--prompts", default="16,120,700", help="prompt lengths (random ids); 700 puts "
                     "sliding layers past the 512-position window (and past a 128-aligned window start)")
    e2e.add_argument("--generator", action="store_true", help="also the real draft/verify loop (its drafter)")
    e2e.add_argument("--build-only", action="store_true")
    costs = sub.add_parser("costs")
    costs.add_argument("--threads", default="2")
    costs.add_argument("--variants", default="gqa-exact,gqa-int8,rowexact-exact,rowexact-int8")
    costs.add_argument("--contexts", default="64,900")
    costs.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.cmd == "ops":
        args.attention = args.attention.split(",")
        args.pasts = [int(p) for p in args.pasts.split(",")]
        run_ops(args)
    elif args.cmd == "costs":
        args.variants = args.variants.split(",")
        args.contexts = [int(c) for c in args.contexts.split(",")]
        run_costs(args)
    else:
        args.variants = args.variants.split(",")
        if args.build_only:
            for name in args.variants:
                print(ensure_variant(name), flush=True)
            return
        run_e2e(args)


if __name__ == "__main__":
    main()

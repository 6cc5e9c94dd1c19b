"""Row-exact attention: a query row gets the same bits alone (decode) as among k+1 rows (verify).

At Gemma 4's head dims (256, 512) onnxruntime's CPU MatMul splits the q.k dot product into blocks whose
size depends on how many keys the call has, so the plain standard-op attention rounds a position's
scores differently in a decode call (T = p + 1 keys) than in a verify call (T = P + k + 1). The row-exact
profile must not: checked at context lengths on both sides of MLAS's block-size steps (T = 32, 64) and
past the sliding window, with the K/V buffers bound in place as the runtime binds them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgegen.export.graphs import PROFILES, LayerPlan, _scatter_rows, _standard_attention
from edgegen.export.onnx_graph import Graph, WeightFile

F32, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
HEADS, WINDOW, MAX_CTX = 8, 512, 1024
ROW_EXACT = PROFILES["cpu"]  # the default CPU profile is the row-exact one


class Attention:
    """One standard-op attention layer over an in-place [1, 1, MAX_CTX, d] K/V buffer pair, or a ring of
    `ring` slots (float16 with fp16)."""

    def __init__(self, tmp, d: int, sliding: bool, threads: int, ring: int = 0, fp16: bool = False,
                 window: int = WINDOW):
        layer = LayerPlan(0, "sliding_attention" if sliding else "full_attention", d, 1, False, 0, ring)
        shared = WeightFile(tmp / "shared.weights")
        profile = dataclasses.replace(ROW_EXACT, kv_fp16=fp16)
        g = Graph("attn", tmp, shared, profile=profile)
        q, k, v = (g.input(n, F32, [1, "S", w]) for n, w in (("q", HEADS * d), ("k", d), ("v", d)))
        g.input("position_ids", I64, [1, "S"])
        g.input("total_sequence_length", I32, [])
        kv_type, rows = (TensorProto.FLOAT16 if fp16 else F32), ring or MAX_CTX
        shape = [1, 1, ring or "max_context", d]
        for name in ("past_key", "past_value"):
            g.input(name, kv_type, shape)
        q, k, v = (g.op("Reshape", t, g.const([1, -1, n, d])) for t, n in ((q, HEADS), (k, 1), (v, 1)))
        keys = _scatter_rows(g, "past_key", k, "present_key", layer)
        values = _scatter_rows(g, "past_value", v, "present_value", layer)
        g.output(_standard_attention(g, q, keys, values, layer, HEADS, window, "position_ids"), "attn", F32)
        g.outputs += [helper.make_tensor_value_info(n, kv_type, shape) for n in ("present_key", "present_value")]
        g.save(tmp)
        g.data.close()
        shared.close()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(tmp / "attn.onnx"), so, providers=["CPUExecutionProvider"])
        dtype = np.float16 if fp16 else np.float32
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, rows, d), dtype)) for _ in "kv"]

    def fill(self, rows: list[np.ndarray]) -> None:
        for buf, r in zip(self.buffers, rows, strict=True):
            a = buf.numpy()
            a[0, 0, :len(r)] = r
            buf.update_inplace(a)

    def __call__(self, q, k, v, past: int) -> np.ndarray:
        b = self.session.io_binding()
        s = q.shape[0]
        for name, a in (("q", q), ("k", k), ("v", v)):
            b.bind_cpu_input(name, np.ascontiguousarray(a[None]))
        b.bind_cpu_input("position_ids", np.arange(past, past + s, dtype=np.int64)[None])
        b.bind_cpu_input("total_sequence_length", np.array(past + s, np.int32))
        for i, name in enumerate(("key", "value")):
            b.bind_ortvalue_input(f"past_{name}", self.buffers[i])
            b.bind_ortvalue_output(f"present_{name}", self.buffers[i])
        b.bind_output("attn")
        self.session.run_with_iobinding(b)
        return b.get_outputs()[2].numpy()[0]



def decoded_and_verified(bundle, prompt: list[int], n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits of the plain greedy continuation's n positions computed one row a call (decode), then the same
    positions recomputed in 5-row calls (verify) after the same prompt."""
    cache = bundle.new_cache()
    logits, _ = bundle.target.forward(cache, prompt)
    tokens, plain = [int(logits[-1].argmax())], []
    while len(tokens) <= n:
        logits, _ = bundle.target.forward(cache, [tokens[-1]])
        tokens.append(int(logits[-1].argmax()))
        plain.append(logits[-1].copy())
    cache.reset()
    bundle.target.forward(cache, prompt)
    verified = []
    for i in range(0, n, 5):
        verified += [row.copy() for row in bundle.target.forward(cache, tokens[i:i + 5], logits_to_keep=5)[0]]
    return plain, verified

@pytest.mark.parametrize("d,sliding", [(256, True), (512, False)])
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_alone_equal_rows_in_a_verify_call(tmp_path, d, sliding, threads):
    attn = Attention(tmp_path, d, sliding, threads)
    rng = np.random.default_rng(0)
    for past in (28, 60, 700):
        context = [rng.standard_normal((past, d), dtype=np.float32) for _ in "kv"]
        q = rng.standard_normal((5, HEADS * d), dtype=np.float32)
        k, v = (rng.standard_normal((5, d), dtype=np.float32) for _ in "kv")
        attn.fill(context)
        alone = np.stack([attn(q[r:r + 1], k[r:r + 1], v[r:r + 1], past + r)[0] for r in range(5)])
        attn.fill(context)
        together = attn(q, k, v, past)
        assert np.array_equal(alone, together), f"past={past}: max diff {np.abs(alone - together).max()}"


RING_WINDOW, RING = 100, 256  # ring_length(100): the window plus a call's 128 rows, rounded up to 128


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_ring_rows_alone_equal_rows_in_a_verify_call_over_wraps(tmp_path, fp16, threads):
    """A sliding layer on a ring: the same stream of K/V rows written by 1-row decodes and by calls of up to
    R - window rows gives bit-identical outputs at every position, over several wraps of the ring (R = 256,
    1100 positions); rows rolled back and rewritten (rejected drafts) leave no trace; and the output equals
    plain attention over the last `window` positions (the ring's masking is the sliding window)."""
    from edgegen.export.graphs import ring_length

    assert ring_length(RING_WINDOW) == RING
    d, n = 256, 1100
    ring = Attention(tmp_path, d, True, threads, ring=RING, fp16=fp16, window=RING_WINDOW)
    rng = np.random.default_rng(threads)
    q = rng.standard_normal((n, HEADS * d), dtype=np.float32)
    k, v = (rng.standard_normal((n, d), dtype=np.float32) for _ in "kv")
    alone = np.stack([ring(q[p:p + 1], k[p:p + 1], v[p:p + 1], p)[0] for p in range(n)])
    ring.fill([np.zeros((RING, d), np.float32)] * 2)
    calls, p = [], 0
    sizes = [3, 1, 156, 5, 2, 100, 1, 7, 33]
    while p < n:
        s = min(sizes[len(calls) % len(sizes)], n - p)
        if s >= 2:  # a rejected draft first: rows written at p.., then overwritten by the real ones
            garbage = rng.standard_normal((s, d), dtype=np.float32)
            ring(q[p:p + s], garbage, garbage, p)
        calls.append(ring(q[p:p + s], k[p:p + s], v[p:p + s], p))
        p += s
    together = np.concatenate(calls)
    assert np.array_equal(alone, together), f"max diff {np.abs(alone - together).max()}"
    # The same math as attention over the last `window` keys (K/V rounded to float16 where stored so).
    kr, vr = (t.astype(np.float16).astype(np.float32) if fp16 else t for t in (k, v))
    for p in (0, 5, RING_WINDOW + 3, RING + 17, n - 1):
        lo = max(0, p - RING_WINDOW + 1)
        qh = q[p].reshape(HEADS, d)
        scores = qh @ kr[lo:p + 1].T
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        expect = (probs / probs.sum(-1, keepdims=True)) @ vr[lo:p + 1]
        np.testing.assert_allclose(alone[p].reshape(HEADS, d), expect, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize(("quant", "compute"), [("int4", "int8"), ("fp32", "exact")])
def test_verify_rows_equal_decode_rows_at_e2b_head_dims(tmp_path, quant: str, compute: str):
    """End to end: a small pair with E2B's head dims (256 sliding, 512 full), int4 with int8 compute or
    fp32, the default (row-exact) CPU profile. Every position's logits from 5-row verify calls (drafts = the
    plain continuation, all accepted) are bit-identical to plain one-row decoding, across the 16-position
    window and its 128-aligned start; greedy speculation (k = 1, 2, 4, the real drafter) gives the plain tokens."""
    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.export.testing import PRESETS, save_pair
    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle

    preset = dataclasses.replace(PRESETS["e2b-like"], head_dim=256, global_head_dim=512, init_std=0.02)
    target, assistant = save_pair(tmp_path / "pair", preset)
    assert ROW_EXACT.standard_attention and ROW_EXACT.row_exact
    export_bundle(str(target), str(assistant), tmp_path / "b",
                  ExportOptions(quant=quant, max_context=512, compute=compute, verify=False))
    bundle = Bundle(tmp_path / "b", threads=2)
    prompt = [int(t) for t in np.random.default_rng(1).integers(4, preset.vocab_size, 150)]
    plain, verified = decoded_and_verified(bundle, prompt, 40)
    assert all(np.array_equal(a, b) for a, b in zip(verified, plain, strict=True))
    gen = Generator(bundle)
    reference = gen.generate(prompt, max_new_tokens=40, use_assistant=False).token_ids
    for k in (1, 2, 4):
        assert gen.generate(prompt, max_new_tokens=40, draft_tokens=k).token_ids == reference, f"k={k}"


@pytest.fixture(scope="module")
def e2b_shaped_pair(tmp_path_factory):
    """E2B's per-layer shapes (hidden 1536, MLP 6144 / 12288, head dims 256 / 512, window 512, 10 layers of
    which 5 KV-shared): the MatMulNBits shapes whose kernels decide row-exactness. Vocabulary 4,096 keeps the
    export and the runs to seconds; random weights."""
    from edgegen.export.testing import PRESETS, save_pair

    preset = dataclasses.replace(PRESETS["e2b-slice"], vocab_size=4096)
    return save_pair(tmp_path_factory.mktemp("e2b-shaped") / "pair", preset), preset


def _greedy_runs(bundle, prompt: list[int], new: int = 40, runs: int = 3) -> tuple[list[int], dict]:
    """Plain greedy output, and {(run, k): speculative output} for k = 1, 2, 4, auto, `runs` times in a row."""
    from edgegen.runtime.generate import Generator

    gen = Generator(bundle)
    gen.eos_ids = set()  # random weights: all `new` tokens, whatever they are
    plain = gen.generate(prompt, max_new_tokens=new, use_assistant=False).token_ids
    return plain, {(run, k): gen.generate(prompt, max_new_tokens=new, draft_tokens=k).token_ids
                   for run in range(runs) for k in (1, 2, 4, "auto")}


@pytest.mark.parametrize("compute", ["auto", "int8"])
def test_int8_compute_speculation_equals_plain_at_e2b_shapes(tmp_path, e2b_shaped_pair, compute: str):
    """The default for int4 on the cpu profile (auto = int8 activations at block 32): greedy speculation gives
    the plain tokens for every k, `auto` included, three runs in a row, before and past the sliding window."""
    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.runtime.model import Bundle

    (target, assistant), preset = e2b_shaped_pair
    export_bundle(str(target), str(assistant), tmp_path / "b",
                  ExportOptions(quant="int4", max_context=1024, compute=compute, verify=False))
    bundle = Bundle(tmp_path / "b", threads=2)
    assert bundle.manifest.graphs["target"].quantization == {"kind": "int4", "block_size": 32, "compute": "int8"}
    for n in (16, 700):
        prompt = [int(t) for t in np.random.default_rng(n).integers(4, preset.vocab_size, n)]
        plain, speculative = _greedy_runs(bundle, prompt)
        assert len(plain) == 40
        assert all(tokens == plain for tokens in speculative.values()), \
            {key: tokens for key, tokens in speculative.items() if tokens != plain}


@pytest.mark.parametrize("block", [64, 128])
def test_int8_compute_at_larger_blocks_is_exact_with_even_rows(tmp_path, e2b_shaped_pair, block: int):
    """At blocks over 32 MatMulNBits computes a lone or trailing row on another path than rows in pairs; the
    runtime pads every odd call by a row (Target.even_rows, from the manifest). Then every verified row equals
    its decode row bit for bit and greedy speculation gives the plain tokens for every k, three runs in a row,
    before and past the sliding window."""
    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.runtime.model import Bundle

    (target, assistant), preset = e2b_shaped_pair
    export_bundle(str(target), str(assistant), tmp_path / "b",
                  ExportOptions(quant="int4", block_size=block, max_context=1024, verify=False))
    bundle = Bundle(tmp_path / "b", threads=2)
    assert bundle.manifest.graphs["target"].quantization == {"kind": "int4", "block_size": block, "compute": "int8"}
    assert bundle.target.even_rows and bundle.target.min_rows == 1
    for n in (16, 700):
        prompt = [int(t) for t in np.random.default_rng(n).integers(4, preset.vocab_size, n)]
        plain_logits, verified = decoded_and_verified(bundle, prompt, 20)
        assert all(np.array_equal(a, b) for a, b in zip(verified, plain_logits, strict=True))
        plain, speculative = _greedy_runs(bundle, prompt)
        assert all(tokens == plain for tokens in speculative.values()), \
            {key: tokens for key, tokens in speculative.items() if tokens != plain}


def test_exact_compute_pads_decode_to_two_rows_and_stays_exact(tmp_path, e2b_shaped_pair):
    """`--compute exact` (fp32 activations): MatMulNBits computes one row on another path than several, so a
    verify row differs from the decode row (measured max |dlogits| ~2e-3). The runtime pads decode calls of
    such bundles to two rows (Target.min_rows): then every verify row equals its decode row bit for bit and
    greedy speculation gives the plain tokens, three runs in a row."""
    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.runtime.model import Bundle

    (target, assistant), preset = e2b_shaped_pair
    export_bundle(str(target), str(assistant), tmp_path / "b",
                  ExportOptions(quant="int4", max_context=1024, compute="exact", verify=False))
    bundle = Bundle(tmp_path / "b", threads=2)
    assert bundle.manifest.graphs["target"].quantization["compute"] == "exact"
    assert bundle.target.min_rows == 2
    prompt = [int(t) for t in np.random.default_rng(7).integers(4, preset.vocab_size, 600)]

    def rows(min_rows: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(decode logits, 5-row verify logits) of the plain continuation's 20 positions."""
        bundle.target.min_rows = min_rows
        return decoded_and_verified(bundle, prompt, 20)

    plain, verified = rows(1)
    assert not all(np.array_equal(a, b) for a, b in zip(plain, verified, strict=True))  # why the padding exists
    plain, verified = rows(2)
    assert all(np.array_equal(a, b) for a, b in zip(plain, verified, strict=True))
    plain, speculative = _greedy_runs(bundle, prompt[:16], new=24)
    assert all(tokens == plain for tokens in speculative.values())


@pytest.fixture(scope="module")
def moe_shaped_pair(tmp_path_factory):
    """26B-A4B's expert shapes (hidden 2816, experts of width 704: int4 blocks of 256 and 64, export/moe.py) in
    two layers (one sliding, one full), 8 experts of which each token picks 4: five tokens give experts 1 to 5
    rows each, odd counts included. Random weights, vocabulary 4,096."""
    from edgegen.export.testing import PRESETS, save_pair

    preset = dataclasses.replace(PRESETS["moe-like"], hidden_size=2816, moe_intermediate_size=704, num_experts=8,
                                 top_k_experts=4, vocab_size=4096, num_layers=2, full_every=2, init_std=0.02)
    return save_pair(tmp_path_factory.mktemp("moe-shaped") / "pair", preset), preset


@pytest.mark.parametrize(("compute", "kv_dtype"), [("int8", "fp32"), ("exact", "fp32"), ("int8", "fp16")])
def test_moe_verify_rows_equal_decode_rows_at_expert_shapes(tmp_path, moe_shaped_pair, compute: str, kv_dtype: str):
    """An int4 MoE target: an expert computes a token's row with the same bits whether the token is alone
    (decode) or one of the expert's rows in a verify call, so every verified position's logits equal the
    plain decode logits bit for bit and greedy speculation gives the plain tokens for every k, three runs;
    with float32 and with float16 K/V buffers."""
    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.runtime.model import Bundle

    (target, assistant), preset = moe_shaped_pair
    export_bundle(str(target), str(assistant), tmp_path / "b",
                  ExportOptions(quant="int4", max_context=256, compute=compute, verify=False, kv_dtype=kv_dtype))
    bundle = Bundle(tmp_path / "b", threads=2)
    assert {b.dtype for b in bundle.manifest.model.kv_buffers} == {{"fp32": "float32", "fp16": "float16"}[kv_dtype]}
    prompt = [int(t) for t in np.random.default_rng(3).integers(4, preset.vocab_size, 40)]
    plain, verified = decoded_and_verified(bundle, prompt, 20)
    assert all(np.array_equal(a, b) for a, b in zip(verified, plain, strict=True))
    tokens, speculative = _greedy_runs(bundle, prompt, new=24)
    assert all(t == tokens for t in speculative.values()), \
        {key: t for key, t in speculative.items() if t != tokens}

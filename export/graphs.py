"""Gemma 4 target and assistant as ONNX graphs with explicit, in-place KV.

Target step graph (prefill, verify S=k+1, decode S=1 all use it):
  every non-shared layer runs GroupQueryAttention on its own preallocated [1, kv_heads, max_ctx, head_dim]
  buffer (past and present are the same OrtValue, bound by the runtime), so a step writes S rows and
  copies nothing that grows with context. A KV-shared layer runs GroupQueryAttention on its *store*
  layer's buffer with the store layer's new K/V: it rewrites the same S rows (idempotent) and attends
  in place. Its present outputs are aliases of the store buffer, listed in the manifest.
cpu profile (standard_attention, row_exact): new rows are scattered into the buffers and attention is a
  masked softmax; sliding layers' buffers are rings of ring_length(window) slots (ring_kv), and with
  kv_fp16 every buffer is float16 (docs/architecture.md, "KV buffers").
Assistant step graph: every layer is KV-shared and cross-attends to the target's store buffers at one
  constant position. GroupQueryAttention again: the "new" K/V is the row already in the buffer at the
  last processed position (gathered, rewritten unchanged), so the query sees exactly the accepted
  positions (sliding layers: the last `window` of them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from edgegen.export import moe
from edgegen.export.onnx_graph import Graph, WeightFile
from edgegen.export.quantize import Linears, Quant, TiedTable
from edgegen.export.row_exact import CHUNK, key_chunks, row_exact_scores, window_start
from edgegen.export.weights import StackedRows, Tensor, Weights
from edgegen.runtime.manifest import (
    DTYPES,
    GUMBEL,
    HIDDEN,
    INPUT_IDS,
    INV_TEMPERATURE,
    LAST_HIDDEN,
    LOGITS,
    LOGITS_START,
    LOGITS_TO_KEEP,
    NEXT_TOKEN,
    PER_LAYER_INPUTS,
    POSITION_IDS,
    PROJECTED_HIDDEN,
    SEQLENS_K,
    SOFT_EMBEDS,
    SOFT_ROWS,
    TOKEN,
    TOKENS,
    TOTAL_SEQUENCE_LENGTH,
    draft_step,
    mask_input,
    new_kv,
    past_kv,
    present_kv,
    rope_inputs,
)

F32, F16, I64, I32 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT32
_ONNX_TYPES = {"float32": F32, "float16": F16, "int64": I64, "int32": I32}  # the manifest's dtypes (DTYPES)
KINDS = ("sliding_attention", "full_attention")
# Rows one target call may write into a ring buffer on top of the window it reads (the runtime splits longer
# calls, runtime/model.py Target.forward): a verify call of k+1 <= 65 rows fits, prefill goes in chunks.
CALL_ROWS = 128


@dataclass(frozen=True)
class Profile:
    """What one execution provider needs from the graphs (docs/architecture.md,
    "Execution-provider profiles").
    The math is the same in every profile; only the ops that express it change."""

    name: str = "cpu"
    # RoPE cos/sin gathered from [max_context, d/2] tables by position id: no int64->float Cast and no
    # Sin/Cos, which WebGPU runs on the CPU.
    rope_tables: bool = False
    # The logits slice starts at an input (-N) instead of int64 arithmetic on N (int64 math is CPU-only on
    # WebGPU and ORT moves small shape computations to the CPU anyway).
    logits_start_input: bool = False
    # Token ids computed on the device (centroid head, draft tokens) stay int32 or float until an ArgMax:
    # WebGPU has no int64 Reshape or Concat.
    device_ids: bool = False
    # RMSNormalization (opset 23) as ReduceMean/Sqrt/Div: OpenVINO has no kernel for it.
    standard_norm: bool = False
    # Attention from standard ops instead of com.microsoft GroupQueryAttention (OpenVINO has none): new K/V
    # rows are scattered into the buffer (present bound to the same memory as past), then masked softmax
    # attention over the first total_sequence_length rows. Only non-shared target layers write K/V.
    standard_attention: bool = False
    # With standard_attention: the query-key products in head-dim chunks of 128 summed in a fixed order, so
    # a position's scores do not depend on how many keys or query rows the call has (export/row_exact.py).
    row_exact: bool = False
    # With row_exact: sliding layers keep their K/V in ring buffers of ring_length(window) slots (position p
    # at slot p mod R) instead of max_context rows, so their memory does not grow with the context.
    ring_kv: bool = False
    # K/V buffers stored as float16 and cast to float32 for attention (export option --kv-dtype fp16).
    kv_fp16: bool = False
    # Static shapes for an NPU (QNN HTP): every query length fixed at export, no com.microsoft op, no int64
    # position arithmetic. The host feeds RoPE cos/sin rows and additive masks per call and writes the new K/V
    # rows the target returns into its buffers (runtime/qnn.py); the graphs are QDQ-quantized after export.
    static_shapes: bool = False
    # The fp32 graphs are calibrated on the real loop and QDQ-quantized after the build (export/qnn.py), in
    # place of the --quant weight formats.
    qdq: bool = False
    # Projections of one input as one matmul, split after: q/k/v of a layer that writes K/V, gate/up of the
    # MLP. Fewer, larger MatMulNBits calls (each wakes the thread pool once); every output column is
    # computed from the same rows, blocks and kernel as when the projections run apart.
    fused_projections: bool = False
    # RoPE as one RotaryEmbedding (opset 23) per q and k, on cos/sin of half the head width: one kernel instead of
    # a Gather, two Muls and an Add (onnxruntime CPU, 128 rows x 8 heads x 256: 61 us vs 819 us). And v's
    # scale-free norm as one RMSNormalization with unit weight instead of five ops.
    fused_rope: bool = False


# One profile per execution provider, keyed by runtime/providers.py's EPS (tests/test_ep.py checks they agree).
PROFILES = {
    # Row-exact standard-op attention on the CPU: a verify row computes the same bits as a decode row, so
    # greedy speculation equals plain decoding (with fp32 or int8-compute weights; export/row_exact.py).
    "cpu": Profile("cpu", standard_attention=True, row_exact=True, ring_kv=True, fused_projections=True,
                   fused_rope=True),
    "qnn": Profile("qnn", standard_attention=True, static_shapes=True, qdq=True),
    "webgpu": Profile("webgpu", rope_tables=True, logits_start_input=True, device_ids=True),
    "openvino": Profile("openvino", standard_norm=True, standard_attention=True),
}


def ring_length(window: int) -> int:
    """Slots of a sliding layer's ring buffer: the window plus one call's new rows, a multiple of CHUNK."""
    return -(-(window + CALL_ROWS) // CHUNK) * CHUNK


def kv_ring(profile: Profile, windows: list[int], max_context: int) -> int:
    """The ring length for this export, or 0 (full-length buffers): only where the profile has rings and
    the ring is shorter than the context. `windows`: the target's sliding window, then the drafter's. Both
    read the ring, and the runtime's call limit (ring - target window, KVCache.max_rows) keeps the target's
    window intact; a drafter with a wider window would need more, so then there is no ring."""
    if not profile.ring_kv or max(windows) > windows[0]:
        return 0
    ring = ring_length(windows[0])
    return ring if ring < max_context else 0


def writes_kv(layer: LayerPlan, profile: Profile) -> bool:
    """Whether the layer has present K/V outputs (aliases of its store buffer)."""
    return not profile.static_shapes and not (profile.standard_attention and layer.shared)


@dataclass(frozen=True)
class TextScales:
    """The constant factors of a Gemma 4 text model, as Gemma4TextModel defines them from its config."""

    embed: float  # embed_tokens: sqrt(hidden)
    ple: float  # embed_tokens_per_layer: sqrt(ple_dim)
    ple_projection: float  # per_layer_model_projection: 1/sqrt(hidden)
    ple_input: float  # (projection + token component) * 1/sqrt(2)

    @classmethod
    def of(cls, cfg) -> TextScales:
        ple = cfg.hidden_size_per_layer_input or 0
        return cls(cfg.hidden_size**0.5, ple**0.5, cfg.hidden_size**-0.5, 2.0**-0.5)


def inv_freqs(cfg) -> dict[str, np.ndarray]:
    """RoPE inverse frequencies per layer kind, from transformers' own rotary module for this config."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    rotary = Gemma4TextRotaryEmbedding(cfg)
    return {kind: getattr(rotary, f"{kind}_inv_freq").float().numpy() for kind in KINDS if kind in cfg.layer_types}


@dataclass
class PLETable:
    """The per-layer-embedding table (token component) as the host reads it: checkpoint rows times `scale`.
    Written to the bundle by row blocks (contents.write_ple), never held whole."""

    rows: Tensor
    scale: float


@dataclass
class LayerPlan:
    index: int
    kind: str
    head_dim: int
    kv_heads: int
    shared: bool  # reads its store layer's K/V
    store: int  # the layer whose buffer it uses (itself if not shared)
    ring: int = 0  # slots of that buffer if it is a ring (sliding layers, Profile.ring_kv), else 0: max_context rows
    top_k: int = 0  # experts per token of its mixture-of-experts block (26B-A4B), 0: no such block


@dataclass
class TargetPlan:
    layers: list[LayerPlan]
    store_layers: dict[str, int]  # kind -> store layer index
    window: int
    hidden: int
    vocab: int
    ple_dim: int
    num_heads: int
    extra: dict = field(default_factory=dict)


def plan_target(cfg, ring: int = 0) -> TargetPlan:
    """ring: the ring length of sliding layers' buffers (0: every buffer holds max_context rows)."""
    modes = cfg.kv_sharing_modes
    first_shared = cfg.num_hidden_layers - cfg.num_kv_shared_layers
    store = {}
    for i in range(first_shared):
        store[cfg.layer_types[i]] = i  # the last non-shared layer of each kind
    layers = []
    for i, kind in enumerate(cfg.layer_types):
        lc = cfg.per_layer_config[i]
        shared = modes[i] == "reuse"
        layers.append(LayerPlan(i, kind, lc.head_dim, lc.num_key_value_heads, shared, store[kind] if shared else i,
                                ring if kind == "sliding_attention" else 0,
                                cfg.top_k_experts if cfg.enable_moe_block else 0))
    return TargetPlan(layers, store, cfg.sliding_window, cfg.hidden_size, cfg.vocab_size,
                      cfg.hidden_size_per_layer_input, cfg.num_attention_heads)


# -- shared pieces ----------------------------------------------------------------------------------


def rms_norm(g: Graph, x: str, weight: np.ndarray, name: str, eps: float) -> str:
    w = g.weight(name, weight.astype(np.float32))
    if g.profile.standard_norm:
        ms = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1]), keepdims=1)
        rms = g.op("Sqrt", g.op("Add", ms, g.const(np.float32(eps), np.float32)))
        return g.op("Mul", g.op("Div", x, rms), w)
    return g.op("RMSNormalization", x, w, axis=-1, epsilon=eps)


def _rms_noscale(g: Graph, x: str, eps: float) -> str:
    ms = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1]), keepdims=1)
    inv = g.op("Pow", g.op("Add", ms, g.const(np.float32(eps), np.float32)), g.const(np.float32(-0.5), np.float32))
    return g.op("Mul", x, inv)


def rope_tables(g: Graph, pos: str, inv_freq: np.ndarray, tag: str, max_context: int) -> tuple[str, str]:
    """cos/sin [1, S, 1, head_dim] for int64 positions [1, S]; HF's cat(freqs, freqs) layout. Profiles with
    fused_rope: [1, S, head_dim/2], what RotaryEmbedding takes (its two halves are the same)."""
    inv_freq = inv_freq.astype(np.float32)
    if g.profile.rope_tables:
        # Same float32 product as HF (positions x inv_freq), evaluated once per position at export.
        freqs = np.arange(max_context, dtype=np.float32)[:, None] * inv_freq[None, :]
        cos, sin = (g.op("Gather", g.weight(f"rope_{f.__name__}.{tag}", f(freqs).astype(np.float32)), pos, axis=0)
                    for f in (np.cos, np.sin))
        return tuple(g.op("Unsqueeze", g.op("Concat", t, t, axis=-1), g.const([2])) for t in (cos, sin))
    pos_f = g.op("Unsqueeze", g.op("Cast", pos, to=F32), g.const([-1]))
    freqs = g.op("Mul", pos_f, g.weight(f"inv_freq.{tag}", inv_freq))
    if g.profile.fused_rope:
        return g.op("Cos", freqs), g.op("Sin", freqs)
    emb = g.op("Concat", freqs, freqs, axis=-1)
    emb = g.op("Unsqueeze", emb, g.const([2]))
    return g.op("Cos", emb), g.op("Sin", emb)


def apply_rope(g: Graph, x: str, cos: str, sin: str) -> str:
    """x [1, S, heads, d] -> x*cos + rotate_half(x)*sin."""
    x1, x2 = g.op("Split", x, axis=-1, num_outputs=2, out=2)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def rope_by_op(g: Graph, x: str, cos: str, sin: str, d: int, n: int) -> str:
    """x [1, S, n, d] -> x*cos + rotate_half(x)*sin as one RotaryEmbedding on [1, S, n*d] (cos/sin [1, S, d/2]).
    It computes each row of each head on its own, so a row's bits do not depend on the call's other rows."""
    flat = g.op("Reshape", x, g.const([1, -1, n * d]))
    return heads(g, g.op("RotaryEmbedding", flat, cos, sin, num_heads=n), n, d)


def rope_by_gather(memo: dict):
    """An apply_rope computing the same bits in 4 nodes instead of 6: rotate_half(x)*sin as
    (x with its halves swapped, one Gather) * (sin with its first half negated, once per graph and layer
    kind, kept in `memo`). (-a)*b and a*(-b) are the same float, so nothing changes but the node count."""

    def rope(g: Graph, x: str, cos: str, sin: str, d: int, n: int) -> str:
        if ("signed sin", sin) not in memo:
            signs = np.concatenate([-np.ones(d // 2), np.ones(d // 2)]).astype(np.float32)
            memo[("signed sin", sin)] = g.op("Mul", sin, g.weight(f"rope_signs.{d}", signs))
        if ("swap", d) not in memo:
            memo[("swap", d)] = g.const(np.concatenate([np.arange(d // 2, d), np.arange(d // 2)]))
        swapped = g.op("Gather", x, memo[("swap", d)], axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", swapped, memo[("signed sin", sin)]))

    return rope


def heads(g: Graph, x: str, n: int, d: int) -> str:
    return g.op("Reshape", x, g.const([1, -1, n, d]))


def _fused(g: Graph, lin: Linears) -> bool:
    """Whether this graph's projections of one input run as one matmul (Profile.fused_projections). Block-
    quantized weights only (MatMulNBits): the QNN graphs share the cpu profile and quantize their fp32
    MatMuls per tensor afterwards, where one scale over q, k and v would cost accuracy."""
    return g.profile.fused_projections and lin.quant.kind != "fp32"


def mlp(g: Graph, lin: Linears, x: str, w: Weights, prefix: str) -> str:
    if _fused(g, lin):
        width = w["gate_proj.weight"].shape[0]
        both = lin(x, f"{prefix}.gate_up_proj", StackedRows([w["gate_proj.weight"], w["up_proj.weight"]]))
        gate, up = g.op("Split", both, g.const([width, width]), axis=-1, out=2)
    else:
        gate = lin(x, f"{prefix}.gate_proj", w["gate_proj.weight"])
        up = lin(x, f"{prefix}.up_proj", w["up_proj.weight"])
    return lin(g.op("Mul", g.op("Gelu", gate, approximate="tanh"), up), f"{prefix}.down_proj", w["down_proj.weight"])


def kv_names(i: int, step: str = "") -> tuple[str, str, str, str]:
    """Buffer inputs are named by the layer that owns them; outputs by the layer (and draft step) that
    writes them."""
    return (*past_kv(i), *present_kv(i, step))


def project_qkv(g, lin, x, w: Weights, layer: LayerPlan, num_heads: int, cos, sin, eps, prefix, rope=None):
    """Per-head q, k (normed, RoPE applied) and raw v [1, S, heads, d] of one layer; k and v are None for a
    KV-shared layer. v's scale-free norm is the caller's: its op choice depends on the EP. rope: a
    rope_by_gather or rope_by_op function, or None for apply_rope."""
    d = layer.head_dim
    if rope is None:
        def rope(g, x, cos, sin, d, n):
            return apply_rope(g, x, cos, sin)
    fused = _fused(g, lin)
    # attention_k_eq_v (26B-A4B, 31B): full layers have no v_proj, their values are the keys before k_norm/RoPE
    k_eq_v = not layer.shared and "v_proj.weight" not in w
    if fused and not layer.shared:
        names = ("q_proj", "k_proj") if k_eq_v else ("q_proj", "k_proj", "v_proj")
        parts = [w[f"{p}.weight"] for p in names]
        qkv = lin(x, f"{prefix}.{'qk' if k_eq_v else 'qkv'}_proj", StackedRows(parts))
        q, k, *v = g.op("Split", qkv, g.const([p.shape[0] for p in parts]), axis=-1, out=len(parts))
        v = k if k_eq_v else v[0]
    else:
        q = lin(x, f"{prefix}.q_proj", w["q_proj.weight"])
    q = heads(g, q, num_heads, d)
    q = rope(g, rms_norm(g, q, w.array("q_norm.weight"), f"{prefix}.q_norm", eps), cos, sin, d, num_heads)
    if layer.shared:
        return q, None, None
    if not fused:
        k = lin(x, f"{prefix}.k_proj", w["k_proj.weight"])
        v = k if k_eq_v else lin(x, f"{prefix}.v_proj", w["v_proj.weight"])
    k = heads(g, k, layer.kv_heads, d)
    k = rope(g, rms_norm(g, k, w.array("k_norm.weight"), f"{prefix}.k_norm", eps), cos, sin, d, layer.kv_heads)
    return q, k, heads(g, v, layer.kv_heads, d)


def attention_block(g, lin, x, w: Weights, layer: LayerPlan, num_heads: int, window: int, cos, sin, eps, prefix,
                    kv_source: dict, step: str = "") -> str:
    """Self-attention of one decoder layer. `kv_source[store]` holds the store layer's new (k, v)."""
    d = layer.head_dim
    rope = rope_by_op if g.profile.fused_rope else (
        rope_by_gather(kv_source.setdefault("memo", {})) if g.profile.standard_attention else None)
    q, k, v = project_qkv(g, lin, x, w, layer, num_heads, cos, sin, eps, prefix, rope)
    if not layer.shared:
        v = (rms_norm(g, v, np.ones(d, np.float32), f"v_norm_unit.{d}", eps) if g.profile.fused_rope
             else _rms_noscale(g, v, eps))
        kv_source[layer.index] = (g.op("Reshape", k, g.const([1, -1, layer.kv_heads * d])),
                                  g.op("Reshape", v, g.const([1, -1, layer.kv_heads * d])))
    past_k, past_v, _, _ = kv_names(layer.store)
    _, _, pres_k, pres_v = kv_names(layer.index, step)
    if g.profile.standard_attention:
        if not layer.shared:  # write the S new rows in place; shared layers and the drafter read the result
            memo = kv_source.setdefault("memo", {})
            kv_source[layer.index] = tuple(_scatter_rows(g, buf, new, out, layer, memo)
                                           for buf, new, out in ((past_k, k, pres_k), (past_v, v, pres_v)))
        out = _standard_attention(g, q, *kv_source[layer.store], layer, num_heads, window, kv_source["mask_positions"],
                                  kv_source.setdefault("memo", {}))
        return lin(out, f"{prefix}.o_proj", w["o_proj.weight"])
    k_new, v_new = kv_source[layer.store]
    q = g.op("Reshape", q, g.const([1, -1, num_heads * d]))
    out = g.op("GroupQueryAttention", q, k_new, v_new, past_k, past_v, SEQLENS_K, TOTAL_SEQUENCE_LENGTH,
               domain="com.microsoft", out=[f"attn.{layer.index}{step}", pres_k, pres_v], num_heads=num_heads,
               kv_num_heads=layer.kv_heads, scale=1.0,
               local_window_size=window if layer.kind == "sliding_attention" else -1)[0]
    return lin(out, f"{prefix}.o_proj", w["o_proj.weight"])


def _scatter_rows(g: Graph, buffer: str, new: str, out: str, layer: LayerPlan, memo: dict | None = None) -> str:
    """buffer [1, kv, rows, d] with the rows of position_ids (ring: slots position mod R) replaced by
    new [1, S, kv, d] (cast to the buffer's dtype); output `out`. memo: as in _standard_attention; the
    scatter index is built once per buffer shape (K and V, and every layer of a kind, share it)."""
    memo = {} if memo is None else memo
    rows = g.op("Transpose", new, perm=[0, 2, 1, 3])  # [1, kv, S, d]
    if g.profile.kv_fp16:
        rows = g.op("Cast", rows, to=F16)
    key = ("scatter index", layer.ring, layer.kv_heads, layer.head_dim)
    if key not in memo:
        slots = g.op("Mod", POSITION_IDS, g.const([layer.ring])) if layer.ring else POSITION_IDS
        memo[key] = g.op("Expand", g.op("Reshape", slots, g.const([1, 1, -1, 1])), g.op("Shape", rows))
    return g.op("ScatterElements", buffer, memo[key], rows, axis=2, out=out)


def _standard_attention(g: Graph, q: str, keys: str, values: str, layer: LayerPlan, num_heads: int, window: int,
                        query_positions: str, memo: dict | None = None) -> str:
    """GroupQueryAttention's result from standard ops. q [1, S, H, d]; keys/values are whole buffers
    [1, kv, max_ctx, d], of which the first total_sequence_length rows are valid, or rings [1, kv, R, d]
    (layer.ring) whose slot s holds the newest position = s mod R below total_sequence_length. Query i sits
    at query_positions[i]: it sees keys j <= that position (sliding layers: the last `window` of them).
    Query head h reads K/V head h // (H / kv), scale 1 (Gemma 4 normalizes q and k instead).
    memo: values this graph computes once and every layer reuses (the graph's kv_source["memo"]): the masks
    of each layer kind, and each store buffer's keys and values as attention reads them (KV-shared layers read
    their store's; a draft round's steps read the same buffers); each is built where it is first needed."""
    memo = {} if memo is None else memo

    def once(key, build):
        if key not in memo:
            memo[key] = build()
        return memo[key]

    d, kv = layer.head_dim, layer.kv_heads
    group = num_heads // kv
    total = once("total", lambda: g.op("Reshape", g.op("Cast", TOTAL_SEQUENCE_LENGTH, to=I64), g.const([1])))
    sliding = window if layer.kind == "sliding_attention" else 0
    first = None
    if not layer.ring and g.profile.row_exact and sliding:
        # Keys before `first` are masked for every query: row_exact sliding layers skip them (a 128-aligned start).
        first = once(("first", query_positions, sliding), lambda: window_start(g, query_positions, sliding))

    # A ring's slots in use: position p sits in slot p until the ring wraps, so min(total, R) slots from slot 0
    # hold every written row (a short context reads its few keys, not R); once wrapped, all R are read.
    ring_end = once(("ring end", layer.ring), lambda: g.op("Min", total, g.const([layer.ring]))) if layer.ring else None

    def read(buffer):
        """[1, kv, T, d] float32: the buffer's rows this call attends to, from a 128-aligned first key (0 or
        `first`), so decode and verify rows sum their keys in the same blocks (export/row_exact.py)."""
        buffer = g.op("Slice", buffer, first or g.const([0]), ring_end or total, g.const([2]))
        if g.profile.kv_fp16:  # after the Slice: only the rows attended to are converted
            buffer = g.op("Cast", buffer, to=F32)
        return buffer

    keys = once(("read", keys, first), lambda: read(keys))
    values = once(("read", values, first), lambda: read(values))
    q = g.op("Transpose", g.op("Reshape", q, g.const([1, -1, kv, group, d])), perm=[0, 2, 3, 1, 4])  # [1,kv,g,S,d]
    if g.profile.row_exact:  # the same bits for a query row whatever the call's other rows (export/row_exact.py)
        # One MatMul per K/V head over all the query rows that share it (group x S): a one-token call gives it
        # `group` rows, never the lone row MLAS computes on another path.
        rows = g.op("Reshape", q, g.const([1, kv, -1, d]))
        scores = row_exact_scores(g, rows, once(("chunks", keys), lambda: key_chunks(g, keys, d)))  # [1,kv,gS,T]
        t = once(("keys", keys), lambda: g.op("Shape", keys, start=2, end=3))
        scores = g.op("Reshape", scores, g.op("Concat", g.const([1, kv, group, -1]), t, axis=0))
    else:
        keys_t = once(("transposed", keys), lambda: g.op("Transpose", g.op("Unsqueeze", keys, g.const([2])),
                                                          perm=[0, 1, 2, 4, 3]))  # [1, kv, 1, d, T]
        scores = g.op("MatMul", q, keys_t)  # [1, kv, group, S, T]
    if layer.ring:
        mask = once(("ring mask", query_positions, sliding, layer.ring),
                    lambda: _ring_mask(g, query_positions, total, sliding, layer.ring, ring_end))
    else:
        mask = once(("mask", query_positions, sliding, first),
                    lambda: _attention_mask(g, query_positions, total, sliding, first))
    probs = g.op("Softmax", g.op("Add", scores, mask), axis=-1)
    if g.profile.row_exact:
        out = g.op("MatMul", g.op("Reshape", probs, g.op("Concat", g.const([1, kv, -1]), t, axis=0)), values)
        out = g.op("Reshape", out, g.const([1, kv, group, -1, d]))
    else:
        out = g.op("MatMul", probs, g.op("Unsqueeze", values, g.const([2])))
    out = g.op("Transpose", out, perm=[0, 3, 1, 2, 4])  # [1, S, kv, group, d]
    return g.op("Reshape", out, g.const([1, -1, num_heads * d]))


def _attention_mask(g: Graph, query_positions: str, total: str, window: int, first: str | None = None) -> str:
    """Additive mask [1, 1, 1, S, T - first]: 0 where key j (first <= j < T) may be seen from query position
    p, else -inf."""
    p = g.op("Reshape", query_positions, g.const([1, 1, 1, -1, 1]))
    start = g.op("Squeeze", first) if first else g.const(0)
    j = g.op("Reshape", g.op("Range", start, g.op("Squeeze", total), g.const(1)), g.const([1, 1, 1, 1, -1]))
    return _visible(g, j, p, window)


def _ring_mask(g: Graph, query_positions: str, total: str, window: int, ring: int, slots: str) -> str:
    """Additive mask [1, 1, 1, S, n] over a ring's first n = `slots` slots (the ones read: min(total, R)).
    Slot s holds position total-1 - ((total-1-s) mod R):
    the newest position that maps to it and was written (a negative value: a slot not written yet). Slots
    holding rows past the cache length (rolled-back drafts, pad rows) are taken for positions R earlier,
    which no query can see as long as a call writes at most R - window rows (runtime: KVCache.max_rows).
    Masked slots add exact zeros to the softmax sums, provided their contents are finite (buffers start
    zeroed; K is normed, V RMS-scaled, so rows never overflow even in float16)."""
    p = g.op("Reshape", query_positions, g.const([1, 1, 1, -1, 1]))
    last = g.op("Sub", total, g.const([1]))
    first_slots = g.op("Slice", g.const(np.arange(ring)), g.const([0]), slots, g.const([0]))
    held = g.op("Sub", last, g.op("Mod", g.op("Sub", last, first_slots), g.const([ring])))
    held = g.op("Reshape", held, g.const([1, 1, 1, 1, -1]))
    return _visible(g, held, p, window, g.op("GreaterOrEqual", held, g.const(0)))


def _visible(g: Graph, j: str, p: str, window: int, written: str | None = None) -> str:
    """0 where key position j may be seen from query position p (j <= p; sliding: j > p - window), else -inf."""
    seen = g.op("LessOrEqual", j, p)
    if window:
        seen = g.op("And", seen, g.op("Greater", j, g.op("Sub", p, g.const(window))))
    if written:
        seen = g.op("And", seen, written)
    return g.op("Where", seen, g.const(np.float32(0), np.float32), g.const(np.float32(-np.inf), np.float32))


def decoder_layer(g, lin, x, w: Weights, layer: LayerPlan, num_heads, window, rope, eps, prefix, kv_source,
                  per_layer_input: str | None, step: str = "", attention=attention_block) -> str:
    """`attention`: attention_block (GroupQueryAttention or the standard-op attention, as the profile says) or
    StaticAttention (the qnn profile), which has the same signature."""
    h = rms_norm(g, x, w.array("input_layernorm.weight"), f"{prefix}.input_layernorm", eps)
    cos, sin = rope[layer.kind]
    h = attention(g, lin, h, w.sub("self_attn"), layer, num_heads, window, cos, sin, eps,
                  f"{prefix}.self_attn", kv_source, step)
    h = rms_norm(g, h, w.array("post_attention_layernorm.weight"), f"{prefix}.post_attention_layernorm", eps)
    x = g.op("Add", x, h)
    h = rms_norm(g, x, w.array("pre_feedforward_layernorm.weight"), f"{prefix}.pre_feedforward_layernorm", eps)
    h = mlp(g, lin, h, w.sub("mlp"), f"{prefix}.mlp")
    if layer.top_k:
        dense = rms_norm(g, h, w.array("post_feedforward_layernorm_1.weight"), f"{prefix}.post_feedforward_layernorm_1",
                         eps)
        h = g.op("Add", dense, _moe_block(g, lin, x, w, layer, eps, prefix))
    h = rms_norm(g, h, w.array("post_feedforward_layernorm.weight"), f"{prefix}.post_feedforward_layernorm", eps)
    x = g.op("Add", x, h)
    if per_layer_input is not None:
        h = g.op("Gelu", lin(x, f"{prefix}.per_layer_input_gate", w["per_layer_input_gate.weight"]),
                 approximate="tanh")
        h = lin(g.op("Mul", h, per_layer_input), f"{prefix}.per_layer_projection", w["per_layer_projection.weight"])
        h = rms_norm(g, h, w.array("post_per_layer_input_norm.weight"), f"{prefix}.post_per_layer_input_norm", eps)
        x = g.op("Add", x, h)
    return g.op("Mul", x, g.weight(f"{prefix}.layer_scalar", w.array("layer_scalar")))


def _moe_block(g: Graph, lin: Linears, x: str, w: Weights, layer: LayerPlan, eps: float, prefix: str) -> str:
    """The experts' share of the feed-forward output (export/moe.py), from the layer's residual stream `x`:
    routed on x itself (scale-free norm), run on its pre_feedforward_layernorm_2 norm, normed after."""
    hidden = w["router.proj.weight"].shape[1]
    weights, ids = moe.route(g, _rms_noscale(g, x, eps), w.sub("router"), layer.top_k, hidden, f"{prefix}.router")
    h = rms_norm(g, x, w.array("pre_feedforward_layernorm_2.weight"), f"{prefix}.pre_feedforward_layernorm_2", eps)
    h = moe.experts(g, lin.quant, h, weights, ids, w.sub("experts"), layer.top_k, hidden, f"{prefix}.experts")
    return rms_norm(g, h, w.array("post_feedforward_layernorm_2.weight"), f"{prefix}.post_feedforward_layernorm_2", eps)


def _common_inputs(g: Graph) -> None:
    _input(g, SEQLENS_K, [1])
    _input(g, TOTAL_SEQUENCE_LENGTH, [])


def _input(g: Graph, name: str, shape: list) -> str:
    """A graph input the manifest names, with its dtype from there."""
    return g.input(name, _ONNX_TYPES[DTYPES[name]], shape)


def _output(g: Graph, value: str, name: str, shape: list) -> str:
    return g.output(value, name, _ONNX_TYPES[DTYPES[name]], shape)


def _kv_shape(layer: LayerPlan, max_context: int | str = "max_context") -> list:
    return [1, layer.kv_heads, layer.ring or max_context, layer.head_dim]


def _kv_type(g: Graph) -> int:
    return F16 if g.profile.kv_fp16 else F32


def _kv_inputs(g: Graph, plan_layers: list[LayerPlan], max_context: int | str = "max_context") -> None:
    for layer in plan_layers:
        pk, pv, _, _ = kv_names(layer.index)
        g.input(pk, _kv_type(g), _kv_shape(layer, max_context))
        g.input(pv, _kv_type(g), _kv_shape(layer, max_context))


def _kv_outputs(g: Graph, layer: LayerPlan, step: str = "") -> None:
    _, _, ok, ov = kv_names(layer.index, step)
    g.outputs.append(_vi(ok, _kv_shape(layer), _kv_type(g)))
    g.outputs.append(_vi(ov, _kv_shape(layer), _kv_type(g)))


def _vi(name, shape, elem_type: int = F32):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem_type, shape)


# -- target ---------------------------------------------------------------------------------------------


def build_target_graph(w: Weights, cfg, quant: Quant, out_dir, shared: WeightFile,
                       untied_lm_head: Tensor | None = None, profile: Profile = PROFILES["cpu"],
                       max_context: int = 0, ring: int = 0, rows: int = 0,
                       name: str = "target", soft_tokens: bool = False) -> tuple[Graph, TargetPlan, PLETable | None]:
    """`w`: the text model's weights (embed_tokens, layers.N..., norm), read one tensor at a time.
    Returns the graph, its plan, and the host-side PLE table (token component, scale folded in).
    max_context: positions the RoPE tables cover (profiles with rope_tables) and, with static shapes, the
    rows of every K/V buffer. ring: sliding layers' ring length (kv_ring), 0 for full-length buffers.
    rows: the query rows of a call with static shapes (the qnn profile: draft tokens + 1 for `target`, more
    for its `prefill` graph, the same model with a longer query: `name`)."""
    plan = plan_target(cfg, ring)
    scales = TextScales.of(cfg)
    g = Graph(name, out_dir, shared, profile=profile)
    lin = Linears(g, quant)
    eps = cfg.rms_norm_eps
    static = profile.static_shapes
    s, n = (rows, rows) if static else ("S", "N")  # query rows in, rows with logits out
    ids = _input(g, INPUT_IDS, [1, s])
    if not static:
        pos = _input(g, POSITION_IDS, [1, s])
        start = _logits_start(g)
    if plan.ple_dim:
        _input(g, PER_LAYER_INPUTS, [1, s, cfg.num_hidden_layers, plan.ple_dim])
    if static:
        rope = _host_position_inputs(g, plan.layers, rows, max_context + rows)
    else:
        _common_inputs(g)
    _kv_inputs(g, [layer for layer in plan.layers if not layer.shared], max_context if static else "max_context")

    table = TiedTable(g, quant, "embed_tokens", w["embed_tokens.weight"], shared=not static)
    x = table.rows(ids, scales.embed)
    if soft_tokens:
        x = soft_token_rows(g, x, plan.hidden)
    if not static:
        rope = {kind: rope_tables(g, pos, freq, f"target.{kind}", max_context) for kind, freq in inv_freqs(cfg).items()}
    per_layer, ple_table = _per_layer_inputs(g, lin, x, w, cfg, plan, scales, rows if static else -1)

    new_rows: list[LayerPlan] = []  # static shapes: layers whose new K/V rows are outputs
    attention = StaticAttention(rows, max_context + rows, new_rows) if static else attention_block
    kv_source: dict = {} if static else {"mask_positions": POSITION_IDS}
    for layer in plan.layers:
        pli = None
        if per_layer is not None:
            pli = g.op("Gather", per_layer, g.const(layer.index), axis=2)
        x = decoder_layer(g, lin, x, w.sub(f"layers.{layer.index}"), layer, plan.num_heads, plan.window, rope, eps,
                          f"layers.{layer.index}", kv_source, pli, attention=attention)
        if writes_kv(layer, profile):
            _kv_outputs(g, layer)

    x = rms_norm(g, x, w.array("norm.weight"), "norm", eps)
    if not static:  # only the last `logits_to_keep` positions need logits and hidden states (prefill: 1, verify: k+1)
        x = g.op("Slice", x, start, g.const([2**62]), g.const([1]))
    _output(g, x, LAST_HIDDEN, [1, n, plan.hidden])
    if static:
        lm = table.table if untied_lm_head is None else TiedTable(g, quant, "lm_head", untied_lm_head).table
        logits = gemm_logits(g, lm, x, rows, plan.hidden, plan.vocab)
    else:
        logits = table.logits(x) if untied_lm_head is None else lin(x, "lm_head", untied_lm_head)
    _output(g, softcap(g, logits, cfg.final_logit_softcapping), LOGITS, [1, n, plan.vocab])
    for layer in new_rows:
        for name in new_kv(layer.index):
            g.outputs.append(_vi(name, [1, layer.kv_heads, rows, layer.head_dim]))
    return g, plan, ple_table


def soft_token_rows(g: Graph, x: str, hidden: int) -> str:
    """x [1, S, H] with the rows soft_rows [M, 1] replaced by soft_embeds [M, H], as transformers' Gemma4Model
    puts image and audio features into inputs_embeds (masked_scatter over the placeholder positions, after the
    token embedding's scaling; the per-layer inputs are then projected from the merged rows). A text call
    feeds M = 0 rows: the scatter copies x and changes no value. Attention stays causal inside an image's
    tokens: E2B and E4B set use_bidirectional_attention to None (export/vision.py refuses "vision")."""
    flat = g.op("Reshape", x, g.const([-1, hidden]))
    merged = g.op("ScatterND", flat, _input(g, SOFT_ROWS, ["M", 1]), _input(g, SOFT_EMBEDS, ["M", hidden]))
    return g.op("Reshape", merged, g.const([1, -1, hidden]))


def _logits_start(g: Graph) -> str:
    """Where the logits slice starts: -N, from the logits_start input or from logits_to_keep (N)."""
    if g.profile.logits_start_input:
        return _input(g, LOGITS_START, [1])
    keep = _input(g, LOGITS_TO_KEEP, [])
    return g.op("Neg", g.op("Unsqueeze", keep, g.const([0])))


def _per_layer_inputs(g: Graph, lin: Linears, x: str, w: Weights, cfg, plan: TargetPlan, scales: TextScales,
                      rows: int) -> tuple[str | None, PLETable | None]:
    """Gemma 4's per-layer inputs [1, S, L, P]: the projection of the embedded tokens plus the host's PLE rows
    (the per_layer_inputs input), and the host PLE table; (None, None) for a model without them."""
    if not plan.ple_dim:
        return None, None
    eps = cfg.rms_norm_eps
    proj = lin(x, "per_layer_model_projection", w["per_layer_model_projection.weight"])
    proj = g.op("Mul", proj, g.const(np.float32(scales.ple_projection), np.float32))
    proj = g.op("Reshape", proj, g.const([1, rows, cfg.num_hidden_layers, plan.ple_dim]))
    proj = rms_norm(g, proj, w.array("per_layer_projection_norm.weight"), "per_layer_projection_norm", eps)
    per_layer = g.op("Mul", g.op("Add", proj, PER_LAYER_INPUTS), g.const(np.float32(scales.ple_input), np.float32))
    return per_layer, PLETable(w["embed_tokens_per_layer.weight"], scales.ple)


def softcap(g: Graph, logits: str, cap: float | None) -> str:
    """cap * tanh(logits / cap) (final_logit_softcapping), or the logits as they are."""
    if not cap:
        return logits
    c = g.const(np.float32(cap), np.float32)
    return g.op("Mul", g.op("Tanh", g.op("Div", logits, c)), c)


# -- assistant --------------------------------------------------------------------------------------------


def assistant_plan(cfg, target_plan: TargetPlan) -> list[LayerPlan]:
    """`cfg`: the assistant's text config."""
    rings = {t.index: t.ring for t in target_plan.layers}
    return [
        LayerPlan(j, kind, cfg.per_layer_config[j].head_dim, cfg.per_layer_config[j].num_key_value_heads, True,
                  target_plan.store_layers[kind], rings[target_plan.store_layers[kind]])
        for j, kind in enumerate(cfg.layer_types)
    ]


def _row_at(g: Graph, buffer: str, index: str, width: int) -> str:
    """The buffer's row at `index`: [1, kv_heads, max_ctx, d] -> [1, 1, kv_heads*d]."""
    row = g.op("Gather", buffer, index, axis=2)
    return g.op("Reshape", g.op("Transpose", row, perm=[0, 2, 1, 3]), g.const([1, 1, width]))


def centroid_logits(g: Graph, lin: Linears, table: TiedTable, h: str, w: Weights, config, vocab: int) -> str:
    """Gemma 4's centroid head: score clusters, keep top-k, score only their tokens, rest get min-1.
    `w`: the masked_embedding weights; `config`: the assistant config (num_centroids, top-k)."""
    top_k, num_centroids = config.centroid_intermediate_top_k, config.num_centroids
    per_cluster = vocab // num_centroids
    scores = lin(h, "masked_embedding.centroids", w["centroids.weight"])
    _, clusters = g.op("TopK", scores, g.const([top_k]), axis=-1, largest=1, sorted=1, out=2)
    id_type = np.int32 if g.profile.device_ids else np.int64
    ordering = w.array("token_ordering").astype(id_type).reshape(num_centroids, per_cluster)
    tokens = g.op("Reshape", g.op("Gather", g.weight("masked_embedding.token_ordering", ordering), clusters, axis=0),
                  g.const([1, top_k * per_cluster]))
    rows = table.rows(g.op("Reshape", tokens, g.const([-1])))  # [top_k*per_cluster, hidden]
    selected = g.op("MatMul", g.op("Reshape", h, g.const([1, -1])), g.op("Transpose", rows, perm=[1, 0]))
    fill = g.op("Sub", g.op("ReduceMin", selected, keepdims=1), g.const(np.float32(1.0), np.float32))
    base = g.op("Expand", fill, g.const([1, vocab]))
    logits = g.op("ScatterElements", base, tokens, selected, axis=1)
    return g.op("Reshape", logits, g.const([1, 1, vocab]))


def build_assistant_graph(aw: Weights, config, target_w: Weights, target_cfg, target_plan: TargetPlan,
                          quant: Quant, target_quant: Quant, out_dir, shared: WeightFile, steps: int | None = None,
                          data: WeightFile | None = None, profile: Profile = PROFILES["cpu"],
                          max_context: int = 0) -> tuple[Graph, list[LayerPlan]]:
    """Draft steps at a constant position over the target's store-layer buffers.

    `aw`: the assistant checkpoint's weights, `config` its Gemma4AssistantConfig; `target_w`/`target_cfg`: the
    target text model's (for its embedding, which the target graph already wrote to `shared`).
    steps=None: the one-step graph `assistant`. steps=k: `draft_round`, k steps unrolled in one call,
    each feeding its token and projected hidden state to the next; the token is
    argmax(logits * inv_temperature + gumbel[i]) (zeros for greedy, Gumbel noise for sampling), so a
    whole round costs one session call. It reads the same weight bytes as `assistant` (`data`).
    Static shapes (qnn): steps over buffers of max_context rows, positions and masks from the host (the same
    for every step of a round: all sit at one position); draft_round is greedy only (no inv_temperature or
    gumbel input): an argmax over uint16-quantized noisy logits would not draw from the distribution q the
    loop accepts drafts by, so sampling drafts in single steps on the host's exact q.
    """
    cfg = config.get_text_config()
    layers = assistant_plan(cfg, target_plan)
    static = profile.static_shapes
    g = Graph("assistant" if steps is None else "draft_round", out_dir, shared, data=data, profile=profile)
    lin = Linears(g, quant)
    vocab = cfg.vocab_size
    tok, hidden, inv_t, gumbel = _assistant_inputs(g, layers, target_plan.hidden, vocab, steps, max_context)
    stores = [next(tl for tl in target_plan.layers if tl.index == i)
              for i in sorted(set(target_plan.store_layers.values()))]
    _kv_inputs(g, stores, max_context if static else "max_context")

    # Input: the target's own embedding of the last token (same bytes as the target graph reads) ⊕ its
    # last hidden state, projected down to the assistant width.
    target_table = TiedTable(g, target_quant, "target_embed_tokens" if static else "embed_tokens",
                             target_w["embed_tokens.weight"], shared=not static)
    own_head = "lm_head.weight" if "lm_head.weight" in aw else "model.embed_tokens.weight"  # tied by default
    # static: the head's table is added at the first head, after the layers' weights in the graph's file
    own = None if static else TiedTable(g, quant, "lm_head", aw[own_head])
    if static:
        rope, attention = _host_rope(layers), StaticAttention(1, max_context, [])
    else:
        rope = {kind: rope_tables(g, POSITION_IDS, freq, f"assistant.{kind}", max_context)
                for kind, freq in inv_freqs(cfg).items()}
        attention = attention_block
    drafter = _Drafter(g, lin, aw, config, layers, rope, _assistant_kv_source(g, stores), attention, own,
                       lambda: TiedTable(g, quant, "lm_head", aw[own_head]))

    embed_scale = TextScales.of(target_cfg).embed
    if steps is None:
        h, hidden = drafter.step(target_table.rows(tok, embed_scale), hidden, "")
        if static:
            _output(g, hidden, PROJECTED_HIDDEN, [1, 1, target_plan.hidden])
            _output(g, drafter.head(h), LOGITS, [1, 1, vocab])
            return g, layers
        logits = drafter.head(h)
        _output(g, hidden, PROJECTED_HIDDEN, [1, 1, target_plan.hidden])
        _output(g, logits, LOGITS, [1, 1, vocab])
        _output(g, g.op("ArgMax", logits, axis=-1, keepdims=0), NEXT_TOKEN, [1, 1])
        return g, layers
    tokens, all_logits = [], []
    for i in range(steps):
        h, hidden = drafter.step(target_table.rows(tok, embed_scale), hidden, draft_step(i))
        logits = drafter.head(h)
        scored = flat = g.op("Reshape", logits, g.const([1, vocab]))
        if not static:  # static (qnn): greedy only, see above
            noise = g.op("Gather", gumbel, g.const([i]), axis=0)  # [1, V]
            scored = g.op("Add", g.op("Mul", flat, inv_t), noise)
        tok = g.op("ArgMax", scored, axis=-1, keepdims=1)  # [1, 1]
        tokens.append(g.op("Unsqueeze", scored, g.const([0])) if profile.device_ids else tok)
        all_logits.append(g.op("Reshape", logits, g.const([1, vocab])))
    if profile.device_ids:  # the same argmaxes over the stacked scores [1, k, V]: no int64 Concat
        _output(g, g.op("ArgMax", g.op("Concat", *tokens, axis=1), axis=-1, keepdims=0), TOKENS, [1, steps])
    else:
        _output(g, g.op("Concat", *tokens, axis=1), TOKENS, [1, steps])
    _output(g, g.op("Concat", *all_logits, axis=0), LOGITS, [steps, vocab])
    return g, layers


@dataclass
class _Drafter:
    """What one draft step is built from: the assistant's layers after its input projection, and its head
    (`own`: its lm_head table)."""

    g: Graph
    lin: Linears
    aw: Weights
    config: object  # Gemma4AssistantConfig
    layers: list[LayerPlan]
    rope: dict
    kv_source: dict
    attention: object  # attention_block or StaticAttention
    own: TiedTable | None
    make_own: Callable[[], TiedTable]  # the head's table, when `own` is not made yet

    def step(self, emb: str, hidden: str, suffix: str) -> tuple[str, str]:
        """(normed hidden state, projected hidden state) of one draft step from the token's embedding."""
        g, lin, aw, cfg = self.g, self.lin, self.aw, self.config.get_text_config()
        x = lin(g.op("Concat", emb, hidden, axis=-1), "pre_projection", aw["pre_projection.weight"])
        for layer in self.layers:
            x = decoder_layer(g, lin, x, aw.sub(f"model.layers.{layer.index}"), layer, cfg.num_attention_heads,
                              cfg.sliding_window, self.rope, cfg.rms_norm_eps, f"layers.{layer.index}",
                              self.kv_source, None, suffix, attention=self.attention)
            if writes_kv(layer, g.profile):
                _kv_outputs(g, layer, suffix)
        h = rms_norm(g, x, aw.array("model.norm.weight"), "norm", cfg.rms_norm_eps)
        return h, lin(h, "post_projection", aw["post_projection.weight"])

    def head(self, h: str) -> str:
        """Logits [1, 1, V]: the centroid head, or the lm_head (static shapes: as a Gemm)."""
        vocab = self.config.get_text_config().vocab_size
        if self.own is None:
            self.own = self.make_own()
        if self.config.use_ordered_embeddings:
            return centroid_logits(self.g, self.lin, self.own, h, self.aw.sub("masked_embedding"), self.config, vocab)
        if self.g.profile.static_shapes:
            return gemm_logits(self.g, self.own.table, h, 1, self.config.get_text_config().hidden_size, vocab)
        return self.own.logits(h)


def _assistant_inputs(g: Graph, layers: list[LayerPlan], hidden_size: int, vocab: int, steps: int | None,
                      max_context: int) -> tuple[str, str, str | None, str | None]:
    """token, hidden and, for draft_round, inv_temperature and gumbel; the position inputs the profile takes."""
    tok = _input(g, TOKEN, [1, 1])
    hidden = _input(g, HIDDEN, [1, 1, hidden_size])
    if g.profile.static_shapes:
        _host_position_inputs(g, layers, 1, max_context)
    else:
        _input(g, POSITION_IDS, [1, 1])
        _common_inputs(g)
    if steps is None:
        return tok, hidden, None, None
    if g.profile.static_shapes:  # a greedy round
        return tok, hidden, None, None
    return tok, hidden, _input(g, INV_TEMPERATURE, []), _input(g, GUMBEL, [steps, vocab])


def _assistant_kv_source(g: Graph, stores: list[LayerPlan]) -> dict:
    """What the drafter's layers attend to, per store layer. Standard-op attention reads the buffers as they
    are. GroupQueryAttention gets the K/V row of the last processed position as its "new" row, rewritten
    unchanged so it attends in place."""
    kv_source = {}
    for tl in stores:
        pk, pv, _, _ = kv_names(tl.index)
        width = tl.kv_heads * tl.head_dim
        if g.profile.standard_attention:  # attend to the buffers as they are: no row rewritten
            kv_source[tl.index] = (pk, pv)
        else:
            kv_source[tl.index] = (_row_at(g, pk, SEQLENS_K, width), _row_at(g, pv, SEQLENS_K, width))
    if g.profile.standard_attention and not g.profile.static_shapes:
        # the drafter's query sits where GQA puts it: the last processed position P-1
        kv_source["mask_positions"] = g.op("Reshape", g.op("Cast", SEQLENS_K, to=I64), g.const([1, 1]))
    return kv_source


# -- static shapes (qnn profile) ----------------------------------------------------------------------------
#
# An NPU compiles a graph for fixed shapes and runs no com.microsoft op, so the qnn profile differs from the
# others in four ways and shares everything else (layer code, weights, plans):
#   - attention is MatMul / Add(mask) / Softmax / MatMul over [past ⊕ new] keys (StaticAttention);
#   - the host computes what depends on the position: RoPE cos/sin rows and an additive mask per layer
#     kind (causal, sliding window, valid cache rows), so the graph holds no int64 arithmetic;
#   - K/V buffers are plain inputs [1, kv_heads, max_ctx, d]; the target returns only the S new rows of
#     each store layer (manifest.new_kv), which the host writes into its buffers (runtime/qnn.py);
#   - every query length is fixed at export: the target runs S = draft_tokens + 1 rows per call (verify; a
#     decode step pads), its `prefill` graph P > S rows (prompts in chunks of P), the assistant one row (the
#     fused draft_round k steps of one row).
# Their IO is listed in runtime/manifest.py.

MASK_VALUE = -100.0  # additive mask; finite and small so that a uint16 QDQ range keeps score precision


def _host_rope(layers: list[LayerPlan]) -> dict[str, tuple[str, str]]:
    return {layer.kind: rope_inputs(layer.kind) for layer in layers}


def _host_position_inputs(g: Graph, layers: list[LayerPlan], rows: int, keys: int) -> dict[str, tuple[str, str]]:
    """RoPE cos/sin rows per layer kind and an additive mask [1, 1, rows, keys] per layer kind, fed by the host."""
    dims = {layer.kind: layer.head_dim for layer in layers}
    for kind, d in dims.items():
        for name in rope_inputs(kind):
            g.input(name, F32, [1, rows, 1, d])
    for kind in dims:
        g.input(mask_input(kind), F32, [1, 1, rows, keys])
    return _host_rope(layers)


def gemm_logits(g: Graph, table: str, x: str, rows: int, hidden: int, vocab: int) -> str:
    """Tied lm_head as Gemm(transB): reads the embedding table itself, no transposed copy."""
    flat = g.op("Reshape", x, g.const([rows, hidden]))
    return g.op("Reshape", g.op("Gemm", flat, table, transB=1), g.const([1, rows, vocab]))


def masked_attention(g: Graph, heads_n: int, kv_heads: int, d: int, q: str, k_all: str, v_all: str, mask: str,
                     rows: int, keys: int) -> str:
    """Standard-op attention. q [1,rows,heads,d], k_all/v_all [1,kv_heads,keys,d], mask [1,1,rows,keys]
    -> [1,rows,heads*d]. Query heads are grouped by the KV head they read (GQA), tensors stay rank <= 4,
    and K/V enter MatMuls as they are (scores are computed transposed): a K/V graph input feeds a
    quantized MatMul directly, which keeps its quantization inside the NPU graph."""
    group = heads_n // kv_heads
    q = g.op("Reshape", g.op("Transpose", q, perm=[0, 2, 1, 3]), g.const([1, kv_heads, group * rows, d]))
    scores = g.op("Transpose", g.op("MatMul", k_all, g.op("Transpose", q, perm=[0, 1, 3, 2])), perm=[0, 1, 3, 2])
    scores = g.op("Reshape", scores, g.const([kv_heads, group, rows, keys]))
    probs = g.op("Softmax", g.op("Add", scores, mask), axis=-1)
    out = g.op("MatMul", g.op("Reshape", probs, g.const([1, kv_heads, group * rows, keys])), v_all)
    out = g.op("Transpose", g.op("Reshape", out, g.const([1, heads_n, rows, d])), perm=[0, 2, 1, 3])
    return g.op("Reshape", out, g.const([1, rows, heads_n * d]))


class StaticAttention:
    """The qnn profile's `attention` for decoder_layer (attention_block's signature).

    kv_source[store] holds the keys/values a query sees ([1, kv_heads, keys, d]); a non-shared layer
    first puts its new rows behind its past buffer there (and outputs them as new_key.{i})."""

    def __init__(self, rows: int, keys: int, new_outputs: list):
        self.rows, self.keys, self.new_outputs = rows, keys, new_outputs

    def __call__(self, g, lin, x, w: Weights, layer: LayerPlan, num_heads, window, cos, sin, eps, prefix, kv_source,
                 step="") -> str:
        d, s = layer.head_dim, self.rows
        q, k, v = project_qkv(g, lin, x, w, layer, num_heads, cos, sin, eps, prefix)
        if not layer.shared:
            v = g.op("RMSNormalization", v, g.weight(f"ones.{d}", np.ones(d, np.float32)), axis=-1, epsilon=eps)
            new_k, new_v = new_kv(layer.index)
            k_new = g.op("Transpose", k, perm=[0, 2, 1, 3], out=new_k)
            v_new = g.op("Transpose", v, perm=[0, 2, 1, 3], out=new_v)
            self.new_outputs.append(layer)
            past_k, past_v = past_kv(layer.index)
            kv_source[layer.index] = (g.op("Concat", past_k, k_new, axis=2), g.op("Concat", past_v, v_new, axis=2))
        k_all, v_all = kv_source[layer.store]
        out = masked_attention(g, num_heads, layer.kv_heads, d, q, k_all, v_all, mask_input(layer.kind), s, self.keys)
        return lin(out, f"{prefix}.o_proj", w["o_proj.weight"])


def host_inv_freqs(target_cfg, assistant_cfg) -> dict[str, list[float]]:
    """RoPE inverse frequencies the host needs for its cos/sin tables, per graph and layer kind."""
    out = {}
    for tag, cfg in (("target", target_cfg), ("assistant", assistant_cfg)):
        for kind, freq in inv_freqs(cfg).items():
            out[f"{tag}.{kind}"] = [float(f) for f in freq]
    return out

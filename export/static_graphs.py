"""Static-shape target and assistant graphs from standard ONNX ops only (the QNN HTP profile).

An NPU compiles a graph for fixed shapes and runs no com.microsoft op, so these graphs differ from the
CPU profile's (graphs.py) in four ways and share everything else (layer code, weights, plans):
  - attention is MatMul / Add(mask) / Softmax / MatMul over [past ⊕ new] keys, not GroupQueryAttention;
  - the host computes what depends on the position: RoPE cos/sin tables and an additive mask per layer
    kind (causal, sliding window, valid cache rows), so the graph holds no int64 arithmetic;
  - K/V buffers are plain inputs [1, kv_heads, max_ctx, d]; the target returns only the S new rows of
    each store layer (`new_key.{i}`), which the host writes into its buffers (runtime/static.py);
  - every query length is fixed at export: the target runs S = draft_tokens + 1 rows per call (verify;
    prefill goes in chunks of S; a decode step pads), the assistant one row.

Graph IO (M = max_context, S = query rows, T = M + S for the target, M for the assistant):
target     in  input_ids [1,S] int64 · per_layer_inputs [1,S,L,P] · rope_cos.{kind} / rope_sin.{kind}
               [1,S,1,d_kind] · attention_mask.{kind} [1,1,S,T] · past_key.{i} / past_value.{i} [1,kvh,M,d]
           out logits [1,S,V] (softcapped) · last_hidden [1,S,H] · new_key.{i} / new_value.{i} [1,kvh,S,d]
assistant  in  token [1,1] int64 · hidden [1,1,H] · rope_cos/sin.{kind} [1,1,1,d] ·
               attention_mask.{kind} [1,1,1,M] · past_key.{s} / past_value.{s} (store layers)
           out logits [1,1,V] · projected_hidden [1,1,H]
"""

from __future__ import annotations

import numpy as np

from edgegen.export.graphs import (
    F32,
    I64,
    KINDS,
    PROFILES,
    LayerPlan,
    PLETable,
    TargetPlan,
    TextScales,
    assistant_plan,
    centroid_logits,
    decoder_layer,
    plan_target,
    project_qkv,
    rms_norm,
)
from edgegen.export.graphs import inv_freqs as kind_inv_freqs
from edgegen.export.onnx_graph import Graph, WeightFile
from edgegen.export.quantize import Linears, Quant, TiedTable, block_rows, row_blocks
from edgegen.export.weights import Tensor, Weights

MASK_VALUE = -100.0  # additive mask; finite and small so that a uint16 QDQ range keeps score precision


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
    """An `attention` for graphs.decoder_layer: same signature as graphs.attention_block.

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
            k_new = g.op("Transpose", k, perm=[0, 2, 1, 3], out=f"new_key.{layer.index}")
            v_new = g.op("Transpose", v, perm=[0, 2, 1, 3], out=f"new_value.{layer.index}")
            self.new_outputs.append(layer)
            kv_source[layer.index] = (g.op("Concat", f"past_key.{layer.index}", k_new, axis=2),
                                      g.op("Concat", f"past_value.{layer.index}", v_new, axis=2))
        k_all, v_all = kv_source[layer.store]
        out = masked_attention(g, num_heads, layer.kv_heads, d, q, k_all, v_all, f"attention_mask.{layer.kind}",
                               s, self.keys)
        return lin(out, f"{prefix}.o_proj", w["o_proj.weight"])


def _rope_inputs(g: Graph, rows: int, dims: dict[str, int]) -> dict[str, tuple[str, str]]:
    return {kind: (g.input(f"rope_cos.{kind}", F32, [1, rows, 1, d]), g.input(f"rope_sin.{kind}", F32, [1, rows, 1, d]))
            for kind, d in dims.items()}


def _kv_inputs(g: Graph, layers: list[LayerPlan], max_context: int) -> None:
    for layer in layers:
        for name in (f"past_key.{layer.index}", f"past_value.{layer.index}"):
            g.input(name, F32, [1, layer.kv_heads, max_context, layer.head_dim])


def _logits(g: Graph, table: str, x: str, rows: int, hidden: int, vocab: int, cap: float | None) -> str:
    """Tied lm_head as Gemm(transB): reads the embedding table itself, no transposed copy."""
    flat = g.op("Reshape", x, g.const([rows, hidden]))
    logits = g.op("Reshape", g.op("Gemm", flat, table, transB=1), g.const([1, rows, vocab]))
    if cap:
        c = g.const(np.float32(cap), np.float32)
        logits = g.op("Mul", g.op("Tanh", g.op("Div", logits, c)), c)
    return logits


def head_dims(layers: list[LayerPlan]) -> dict[str, int]:
    return {layer.kind: layer.head_dim for layer in layers}


def _table(g: Graph, name: str, w) -> str:
    """A whole fp32 table as an initializer, written by row blocks."""
    return g.weight_blocks(name, tuple(w.shape), np.float32, row_blocks(w, block_rows(w)))


def build_static_target(w: Weights, cfg, out_dir, max_context: int, rows: int,
                        untied_lm_head: Tensor | None = None) -> tuple[Graph, TargetPlan, PLETable | None]:
    """fp32 static target graph with `rows` query rows; returns graph, plan, host PLE table."""
    plan = plan_target(cfg)
    g = Graph("target", out_dir, WeightFile(out_dir / "unused_shared.weights"), profile=PROFILES["qnn"])
    lin = Linears(g, Quant("fp32"))
    eps, keys = cfg.rms_norm_eps, max_context + rows
    ids = g.input("input_ids", I64, [1, rows])
    if plan.ple_dim:
        g.input("per_layer_inputs", F32, [1, rows, cfg.num_hidden_layers, plan.ple_dim])
    rope = _rope_inputs(g, rows, head_dims(plan.layers))
    for kind in KINDS:
        g.input(f"attention_mask.{kind}", F32, [1, 1, rows, keys])
    _kv_inputs(g, [layer for layer in plan.layers if not layer.shared], max_context)

    scales = TextScales.of(cfg)
    table = _table(g, "embed_tokens.weight", w["embed_tokens.weight"])
    x = g.op("Mul", g.op("Gather", table, ids, axis=0), g.const(np.float32(scales.embed), np.float32))
    per_layer, ple_table = None, None
    if plan.ple_dim:
        proj = lin(x, "per_layer_model_projection", w["per_layer_model_projection.weight"])
        proj = g.op("Mul", proj, g.const(np.float32(scales.ple_projection), np.float32))
        proj = g.op("Reshape", proj, g.const([1, rows, cfg.num_hidden_layers, plan.ple_dim]))
        proj = rms_norm(g, proj, w.array("per_layer_projection_norm.weight"), "per_layer_projection_norm", eps)
        per_layer = g.op("Mul", g.op("Add", proj, "per_layer_inputs"),
                         g.const(np.float32(scales.ple_input), np.float32))
        ple_table = PLETable(w["embed_tokens_per_layer.weight"], scales.ple)

    new_layers: list[LayerPlan] = []
    attention = StaticAttention(rows, keys, new_layers)
    kv_source: dict = {}
    for layer in plan.layers:
        pli = g.op("Gather", per_layer, g.const(layer.index), axis=2) if per_layer is not None else None
        x = decoder_layer(g, lin, x, w.sub(f"layers.{layer.index}"), layer, plan.num_heads, plan.window, rope, eps,
                          f"layers.{layer.index}", kv_source, pli, attention=attention)
    x = rms_norm(g, x, w.array("norm.weight"), "norm", eps)
    g.output(x, "last_hidden", F32, [1, rows, plan.hidden])
    lm = table if untied_lm_head is None else _table(g, "lm_head.weight", untied_lm_head)
    g.output(_logits(g, lm, x, rows, plan.hidden, plan.vocab, cfg.final_logit_softcapping), "logits", F32,
             [1, rows, plan.vocab])
    for layer in new_layers:
        for name in (f"new_key.{layer.index}", f"new_value.{layer.index}"):
            g.outputs.append(_value_info(name, [1, layer.kv_heads, rows, layer.head_dim]))
    return g, plan, ple_table


def _value_info(name: str, shape: list):
    from onnx import helper

    return helper.make_tensor_value_info(name, F32, shape)


def build_static_assistant(aw: Weights, config, target_w: Weights, target_cfg, target_plan: TargetPlan, out_dir,
                           max_context: int) -> tuple[Graph, list[LayerPlan]]:
    """fp32 one-step assistant graph: one query row over the store layers' buffers."""
    cfg = config.get_text_config()
    layers = assistant_plan(cfg, target_plan)
    g = Graph("assistant", out_dir, WeightFile(out_dir / "unused_shared.weights"), profile=PROFILES["qnn"])
    lin = Linears(g, Quant("fp32"))
    eps, vocab = cfg.rms_norm_eps, cfg.vocab_size
    tok = g.input("token", I64, [1, 1])
    hidden = g.input("hidden", F32, [1, 1, target_plan.hidden])
    rope = _rope_inputs(g, 1, head_dims(layers))
    for kind in sorted({layer.kind for layer in layers}):
        g.input(f"attention_mask.{kind}", F32, [1, 1, 1, max_context])
    store_ids = sorted(set(target_plan.store_layers.values()))
    stores = [next(t for t in target_plan.layers if t.index == i) for i in store_ids]
    _kv_inputs(g, stores, max_context)

    target_table = _table(g, "target_embed_tokens.weight", target_w["embed_tokens.weight"])
    scale = np.float32(TextScales.of(target_cfg).embed)
    x = g.op("Mul", g.op("Gather", target_table, tok, axis=0), g.const(scale, np.float32))
    x = lin(g.op("Concat", x, hidden, axis=-1), "pre_projection", aw["pre_projection.weight"])
    kv_source = {s.index: (f"past_key.{s.index}", f"past_value.{s.index}") for s in stores}
    attention = StaticAttention(1, max_context, [])
    for layer in layers:
        x = decoder_layer(g, lin, x, aw.sub(f"model.layers.{layer.index}"), layer, cfg.num_attention_heads,
                          cfg.sliding_window, rope, eps, f"layers.{layer.index}", kv_source, None, attention=attention)
    h = rms_norm(g, x, aw.array("model.norm.weight"), "norm", eps)
    g.output(lin(h, "post_projection", aw["post_projection.weight"]), "projected_hidden", F32,
             [1, 1, target_plan.hidden])
    head = aw["lm_head.weight" if "lm_head.weight" in aw else "model.embed_tokens.weight"]
    if config.use_ordered_embeddings:
        logits = centroid_logits(g, lin, TiedTable(g, Quant("fp32"), "lm_head", head), h,
                                 aw.sub("masked_embedding"), config, vocab)
    else:
        logits = _logits(g, _table(g, "lm_head.weight", head), h, 1, cfg.hidden_size, vocab, None)
    g.output(logits, "logits", F32, [1, 1, vocab])
    return g, layers


def inv_freqs(target_cfg, assistant_cfg) -> dict[str, list[float]]:
    """RoPE inverse frequencies the host needs for its cos/sin tables, per graph and layer kind."""
    out = {}
    for tag, cfg in (("target", target_cfg), ("assistant", assistant_cfg)):
        for kind, freq in kind_inv_freqs(cfg).items():
            out[f"{tag}.{kind}"] = [float(f) for f in freq]
    return out

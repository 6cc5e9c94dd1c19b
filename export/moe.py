"""Gemma 4's mixture-of-experts block (26B-A4B) as standard ONNX ops plus GatherBlockQuantized.

Routing, as transformers' Gemma4TextRouter computes it: the layer's residual input, RMS-normalized without
scale, times `router.scale` and hidden^-1/2, projected to one score per expert; softmax over all experts;
top-k; the k probabilities renormalized to sum to 1, then times `per_expert_scale` of the chosen experts.

Dispatch: each (token, slot) pair gathers its expert's weights (gate_up [2I, H], down [H, I]) and runs one
matrix-vector product with them, so a decode step reads k experts' bytes of the E in each layer and a
verify call of S tokens reads S*k (the same expert twice when two tokens choose it). Quantized experts are
stored block-wise (int4/int8 codes + scales, the rounding of export/quantize.py) and dequantized by
GatherBlockQuantized as they are gathered; fp32 experts by a plain Gather.

Why not com.microsoft QMoE/MoE: onnxruntime's CPU kernels offer relu/gelu/silu/swiglu, and GELU-tanh(gate)*up
("geglu"), which Gemma 4's experts compute, only on CUDA; nor do they take a per-expert output scale.
"""

from __future__ import annotations

import numpy as np

from edgegen.export.onnx_graph import Graph
from edgegen.export.quantize import Quant, pack, quantize_blocks
from edgegen.export.weights import Weights


def route(g: Graph, normed: str, w: Weights, top_k: int, hidden: int, prefix: str) -> tuple[str, str]:
    """(weights [1, S, k] float, expert ids [1, S, k] int64) from the scale-free RMS-normed residual.
    The router stays fp32 in every weight format: it is small (E x H) and a rounded score could change
    which experts run."""
    scale = w.array("scale") * np.float32(hidden**-0.5)  # hidden * scale * hidden^-1/2, one constant vector
    x = g.op("Mul", normed, g.weight(f"{prefix}.scale", scale.astype(np.float32)))
    proj = w.array("proj.weight")  # [E, H]
    scores = g.op("MatMul", x, g.weight(f"{prefix}.proj", np.ascontiguousarray(proj.T)))
    probs = g.op("Softmax", scores, axis=-1)
    top, ids = g.op("TopK", probs, g.const([top_k]), axis=-1, largest=1, sorted=1, out=2)
    top = g.op("Div", top, g.op("ReduceSum", top, g.const([-1]), keepdims=1))
    per_expert = g.weight(f"{prefix}.per_expert_scale", w.array("per_expert_scale").astype(np.float32))
    return g.op("Mul", top, g.op("Gather", per_expert, ids, axis=0)), ids


def _stacked(g: Graph, quant: Quant, name: str, tensor) -> tuple[str, str | None, int]:
    """An expert tensor [E, N, K] stored for gathering by expert: fp32 as it is, or block-quantized codes
    [E, N, K*bits/8] + scales [E, N, K/block], one expert at a time (never the whole tensor in memory)."""
    e, n, k = tensor.shape
    per_block = max(1, tensor.block_rows())
    if quant.kind == "fp32":
        blocks = (np.asarray(tensor[i : i + per_block], np.float32) for i in range(0, e, per_block))
        return g.weight_blocks(name, (e, n, k), np.float32, blocks), None, 0
    bits, block = quant.bits, quant.block_for(k)
    scales = np.empty((e, n, k // block), np.float32)

    def codes():
        for i in range(0, e, per_block):
            chunk = np.asarray(tensor[i : i + per_block], np.float32)
            out = np.empty((len(chunk), n, k * bits // 8), np.uint8)
            for j, expert in enumerate(chunk):
                c, scales[i + j] = quantize_blocks(expert, bits, block)
                out[j] = pack(c, bits)
            yield out

    data = g.weight_blocks(f"{name}.qweight", (e, n, k * bits // 8), np.uint8, codes())
    return data, g.weight(f"{name}.scales", scales), block


def _gather(g: Graph, quant: Quant, stored: tuple[str, str | None, int], ids: str) -> str:
    """The chosen experts' weights [S*k, N, K] as float32."""
    data, scales, block = stored
    if scales is None:
        return g.op("Gather", data, ids, axis=0)
    return g.ms("GatherBlockQuantized", data, ids, scales, gather_axis=0, quantize_axis=2, block_size=block,
                bits=quant.bits)


def experts(g: Graph, quant: Quant, h: str, weights: str, ids: str, w: Weights, top_k: int, hidden: int,
            prefix: str) -> str:
    """sum over the k slots of weight * down(gelu_tanh(gate(h)) * up(h)) with the slot's expert: [1, S, H].
    `h`: the pre_feedforward_layernorm_2 output [1, S, H]; `w`: the layer's `experts` weights."""
    gate_up = _stacked(g, quant, f"{prefix}.gate_up_proj", w["gate_up_proj"])
    down = _stacked(g, quant, f"{prefix}.down_proj", w["down_proj"])
    inter = w["down_proj"].shape[2]
    flat_ids = g.op("Reshape", ids, g.const([-1]))  # [S*k], token-major
    # each token's row once per slot, as a column vector: [S*k, H, 1]
    x = g.op("Expand", g.op("Reshape", h, g.const([-1, 1, hidden])), g.const([1, top_k, 1]))
    x = g.op("Reshape", x, g.const([-1, hidden, 1]))
    both = g.op("Reshape", g.op("MatMul", _gather(g, quant, gate_up, flat_ids), x), g.const([-1, 2 * inter]))
    gate, up = g.op("Split", both, g.const([inter, inter]), axis=-1, out=2)
    act = g.op("Reshape", g.op("Mul", g.op("Gelu", gate, approximate="tanh"), up), g.const([-1, inter, 1]))
    out = g.op("MatMul", _gather(g, quant, down, flat_ids), act)  # [S*k, H, 1]
    out = g.op("Mul", g.op("Reshape", out, g.const([1, -1, top_k, hidden])), g.op("Unsqueeze", weights, g.const([-1])))
    return g.op("ReduceSum", out, g.const([2]), keepdims=0)

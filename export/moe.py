"""Gemma 4's mixture-of-experts block (26B-A4B) as standard ONNX ops plus GatherBlockQuantized.

Routing, as transformers' Gemma4TextRouter computes it: the layer's residual input, RMS-normalized without
scale, times `router.scale` and hidden^-1/2, projected to one score per expert; softmax over all experts;
top-k; the k probabilities renormalized to sum to 1, then times `per_expert_scale` of the chosen experts.

Dispatch: a Loop over the experts the call's tokens chose (`experts`): each iteration gathers one expert's
weights (gate_up [2I, H], down [H, I]) and runs its tokens through them, so a decode step reads k of the E
experts of each layer and a verify call of S tokens the union of theirs. Quantized experts are stored
block-wise (int4/int8 codes + scales, the rounding of export/quantize.py) and dequantized by
GatherBlockQuantized as they are gathered; fp32 experts by a plain Gather. (Gathering per (token, slot)
instead would hold S*k dequantized experts at once: 32 GB for a 256-token prefill at 26B-A4B width.)

Why not com.microsoft QMoE/MoE: onnxruntime's CPU kernels offer relu/gelu/silu/swiglu, and GELU-tanh(gate)*up
("geglu"), which Gemma 4's experts compute, only on CUDA; nor do they take a per-expert output scale.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edgegen.export.onnx_graph import Graph
from edgegen.export.quantize import Quant, pack, quantize_blocks
from edgegen.export.weights import Weights

# Experts are quantized in blocks of at least this many weights (one float32 scale each): 0.53 bytes per int4
# weight instead of 0.625 at block 32. The 26B-A4B's experts are 22.8B of its 25.2B weights; with blocks of 32
# its int4 bundle would take ~17.7 GiB of RSS to run, with 128 ~14.5 GiB (benchmarks/moe_slices.py, README).
EXPERT_BLOCK = 128


def expert_quant(quant: Quant) -> Quant:
    """The weight format of the experts for a bundle quantized as `quant` (fp32 stays fp32)."""
    return replace(quant, block_size=max(quant.block_size, EXPERT_BLOCK))


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


class _Body:
    """Nodes of a Loop body. Its inputs are (iteration, condition, carried values); anything else it names is
    a value or initializer of the enclosing graph (ONNX outer scope)."""

    def __init__(self, tag: str):
        self.tag, self.nodes, self._count = tag, [], 0

    def op(self, op_type: str, *inputs: str, out: int = 1, domain: str = "", **attrs):
        from onnx import helper

        self._count += 1
        outs = [f"{self.tag}.{op_type.lower()}_{self._count}_{i}" for i in range(out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain, **attrs))
        return outs[0] if out == 1 else outs


def _expert(b: _Body, quant: Quant, stored: tuple[str, str | None, int], expert: str, shape: tuple[int, int]) -> str:
    """One expert's matrix [N, K] as float32: only its bytes are read (dequantized as gathered)."""
    data, scales, block = stored
    if scales is None:
        w = b.op("Gather", data, expert, axis=0)
    else:
        w = b.op("GatherBlockQuantized", data, expert, scales, domain="com.microsoft", gather_axis=0,
                 quantize_axis=2, block_size=block, bits=quant.bits)
    return b.op("Reshape", w, shape)


def experts(g: Graph, quant: Quant, h: str, weights: str, ids: str, w: Weights, top_k: int, hidden: int,
            prefix: str) -> str:
    """sum over the k slots of weight * down(gelu_tanh(gate(h)) * up(h)) with the slot's expert: [1, S, H].
    `h`: the pre_feedforward_layernorm_2 output [1, S, H]; `w`: the layer's `experts` weights.

    A Loop over the experts the call's tokens chose (ascending, as transformers' loop visits them): each
    iteration reads one expert's weights, runs the tokens routed to it as one matrix, and adds their weighted
    outputs into the tokens' rows. A decode step reads k experts, a verify call the union of its tokens'
    experts, and memory holds one expert's float32 weights at a time whatever the call's length. The sum per
    token runs in expert order for every call length, so a verify row computes a decode row's bits."""
    from onnx import TensorProto, helper

    quant = expert_quant(quant)
    gate_up = _stacked(g, quant, f"{prefix}.gate_up_proj", w["gate_up_proj"])
    down = _stacked(g, quant, f"{prefix}.down_proj", w["down_proj"])
    inter = w["down_proj"].shape[2]
    x = g.op("Reshape", h, g.const([-1, hidden]))  # [S, H]
    flat_ids = g.op("Reshape", ids, g.const([-1]))  # [S*k], token-major
    flat_weights = g.op("Reshape", weights, g.const([-1]))
    chosen = g.op("Unique", flat_ids, sorted=1, out=4)[0]  # the experts this call runs, ascending
    trips = g.op("Squeeze", g.op("Shape", chosen), g.const([0]))
    zeros = g.op("Mul", x, g.const(np.float32(0), np.float32))

    b = _Body(prefix)
    it, cond, acc = f"{prefix}.i", f"{prefix}.cond", f"{prefix}.acc"
    expert = b.op("Unsqueeze", b.op("Gather", chosen, it, axis=0), g.const([0]))  # [1]
    slots = b.op("Reshape", b.op("NonZero", b.op("Equal", flat_ids, expert)), g.const([-1]))  # [m]
    tokens = b.op("Div", slots, g.const(np.int64(top_k)))
    rows = b.op("Gather", x, tokens, axis=0)  # [m, H]
    both = b.op("Gemm", rows, _expert(b, quant, gate_up, expert, g.const([2 * inter, hidden])), transB=1)
    gate, up = b.op("Split", both, g.const([inter, inter]), axis=-1, out=2)
    act = b.op("Mul", b.op("Gelu", gate, approximate="tanh"), up)
    y = b.op("Gemm", act, _expert(b, quant, down, expert, g.const([hidden, inter])), transB=1)  # [m, H]
    y = b.op("Mul", y, b.op("Unsqueeze", b.op("Gather", flat_weights, slots, axis=0), g.const([-1])))
    acc_out = b.op("ScatterND", acc, b.op("Unsqueeze", tokens, g.const([-1])), y, reduction="add")
    cond_out = b.op("Identity", cond)
    body = helper.make_graph(
        b.nodes, f"{prefix}.loop",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
         helper.make_tensor_value_info(acc, TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
         helper.make_tensor_value_info(acc_out, TensorProto.FLOAT, None)])
    out = g.op("Loop", trips, "", zeros, body=body)
    return g.op("Reshape", out, g.const([1, -1, hidden]))

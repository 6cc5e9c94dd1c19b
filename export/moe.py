"""Gemma 4's mixture-of-experts block (26B-A4B) as standard ONNX ops plus MatMulNBits.

Routing, as transformers' Gemma4TextRouter computes it: the layer's residual input, RMS-normalized without
scale, times `router.scale` and hidden^-1/2, projected to one score per expert; softmax over all experts;
top-k; the k probabilities renormalized to sum to 1, then times `per_expert_scale` of the chosen experts.

Dispatch (`experts`): every expert is a chain of nodes in the layer's graph with its own weights (gate_up
[2I, H], down [H, I]) as MatMulNBits (or fp32 MatMul) constants, fed the rows of the tokens that chose it:
none for most experts in a call, and a MatMulNBits of no rows returns at once without reading its weights.
So a decode step reads k of the E experts of each layer and a verify call of S tokens the union of theirs.
Why this shape, measured on onnxruntime 1.32 CPU at 26B-A4B width:
- MatMulNBits is fast only with constant weights it has pre-packed (~0.1 ms an expert); given weights as a
  runtime value (gathered from a stacked tensor) it dequantizes them to fp32 first (~3.7 ms), as
  GatherBlockQuantized + MatMul did (8.8-14.5x the roofline of the bytes a decode step reads).
- The 128 experts' ~770 nodes a layer cost ~0.2 ms a call when no token chose any of them. The previous
  dispatch, a binary tree of If nodes over the expert ids with the experts in its branches, ran fewer nodes
  but cost more: every If branch is a subgraph with its own session state in onnxruntime (~30 KB, plus
  ~1.4 KB per outer value it reads; 29-45 MB a layer, ~1 GiB at 30 layers), onnxruntime pre-packs branch
  weights without releasing their mapped originals, and running a branch costs more than a node of no rows.
- The gathers, pads and scatters around the experts are one op each per layer (`_Call`), not one per expert.

Why not com.microsoft QMoE/MoE: onnxruntime's CPU kernels offer relu/gelu/silu/swiglu, and GELU-tanh(gate)*up
("geglu"), which Gemma 4's experts compute, only on CUDA; nor do they take a per-expert output scale.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edgegen.export.onnx_graph import Graph
from edgegen.export.quantize import Linears, Quant
from edgegen.export.weights import Weights

# Experts are quantized in blocks of up to this many weights (one float32 scale each; the down projection's
# 704 inputs take 64): 0.52 bytes per int4 weight instead of 0.625 at block 32. The 26B-A4B's experts are
# 22.8B of its 25.2B weights: pre-packed for int8 compute, an expert takes 3.24 MB at blocks 256/64, 3.40 MB at
# 128/64 and 4.36 MB at 32 (measured, onnxruntime 1.32): 12.2 GiB for the 30 layers' experts at 256/64. The
# searched scales (export/quantize.py) make blocks of 256 more accurate than blocks of 128 were with max/7.
EXPERT_BLOCK = 256


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


class _Expert:
    """Expert `index` [N, K] of a stacked [E, N, K] checkpoint tensor, as Linears reads a weight: whole, once."""

    def __init__(self, tensor, index: int):
        self.tensor, self.index = tensor, index
        self.shape = tuple(tensor.shape[1:])

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.tensor[self.index : self.index + 1], np.float32)[0][rows]

    def numpy(self) -> np.ndarray:
        return self[:]

    def block_rows(self) -> int:
        return self.shape[0]


class _Call:
    """What the experts of one MoE block read, computed once per layer before them:

    - the call's (token, slot) pairs in slot order, each token's k slots sorted by expert id;
    - `rows`: the tokens' rows grouped by expert, expert 0's first, each group in slot order and, when the
      experts are quantized, padded to an even count with a zero row; `start[e]`, `end[e]`: expert e's group;
    - `position`: where each slot's row sits in `rows` (and its output in the experts' concatenated output).
    An expert is then a Slice and its matmuls."""

    def __init__(self, g: Graph, h: str, weights: str, ids: str, hidden: int, inter: int, top_k: int,
                 n_experts: int, paired: bool):
        from onnx import TensorProto

        # Each token's slots in ascending expert order: its sum over them then runs in transformers' order
        # (Gemma4TextExperts adds the experts' outputs expert by expert), whatever the call length.
        ids, order = g.op("TopK", ids, g.const([top_k]), axis=-1, largest=0, sorted=1, out=2)
        self.weights = g.op("Reshape", g.op("GatherElements", weights, order, axis=-1), g.const([-1, 1]))  # [S*k, 1]
        x = g.op("Reshape", h, g.const([-1, hidden]))  # [S, H]
        flat = g.op("Reshape", ids, g.const([-1]))  # [S*k], token-major
        onehot = g.op("Cast", g.op("Equal", g.op("Unsqueeze", flat, g.const([1])),
                                   g.const(np.arange(n_experts)[None, :])), to=TensorProto.FLOAT)  # [S*k, E]
        counts = g.op("ReduceSum", onehot, g.const([0]), keepdims=0)  # [E]: slots that chose e

        # Rows per expert (even when paired: MatMulNBits computes a lone row on another kernel path than rows
        # in pairs, export/row_exact.py) and where each expert's group starts and ends.
        counts = g.op("Cast", counts, to=TensorProto.INT64)
        sizes = g.op("Add", counts, g.op("Mod", counts, g.const([2]))) if paired else counts
        end = g.op("CumSum", sizes, g.const(np.int64(0)))
        start = g.op("Sub", end, sizes)
        self.start = g.op("Split", start, axis=0, num_outputs=n_experts, out=n_experts)  # [1] each
        self.end = g.op("Split", end, axis=0, num_outputs=n_experts, out=n_experts)
        # A slot's row: its expert's start + how many earlier slots chose the same expert.
        before = g.op("CumSum", onehot, g.const(np.int64(0)), exclusive=1)  # [S*k, E]
        rank = g.op("GatherElements", before, g.op("Unsqueeze", flat, g.const([1])), axis=1)  # [S*k, 1]
        rank = g.op("Cast", g.op("Reshape", rank, g.const([-1])), to=TensorProto.INT64)
        self.position = g.op("Add", g.op("Gather", start, flat, axis=0), rank)  # [S*k]
        n = g.op("Squeeze", g.op("Shape", x, start=0, end=1), g.const([0]))  # S
        token = g.op("Div", g.op("Range", g.const(np.int64(0)), g.op("Mul", n, g.const(np.int64(top_k))),
                                 g.const(np.int64(1))), g.const(np.int64(top_k)))  # [S*k]: each slot's token
        total = g.op("ReduceSum", sizes, g.const([0]), keepdims=1)  # [1]
        if paired:  # pad rows read row S, a zero row
            zero = g.weight(f"moe.zero_row.{hidden}", np.zeros((1, hidden), np.float32))  # shared by layers
            x = g.op("Concat", x, zero, axis=0)
        source = g.op("Expand", g.op("Unsqueeze", n, g.const([0])), total)  # [P]: every row a pad row...
        source = g.op("ScatterElements", source, self.position, token, axis=0)  # ...but the slots' own
        self.rows = g.op("Gather", x, source, axis=0)  # [P, H]
        self.axis0, self.halves = g.const([0]), g.const([inter, inter])  # the experts' Slice axes, gate/up split


def _expert(g: Graph, call: _Call, quant: Quant, w: Weights, e: int, prefix: str) -> str:
    """down(gelu_tanh(gate(x)) * up(x)) for the rows of expert `e` (its group of call.rows, pad row included;
    no rows when no token chose it, and then its weights are not read)."""
    rows = g.op("Slice", call.rows, call.start[e], call.end[e], call.axis0)
    lin = Linears(g, quant)
    both = lin(rows, f"{prefix}.{e}.gate_up_proj", _Expert(w["gate_up_proj"], e))
    gate, up = g.op("Split", both, call.halves, axis=-1, out=2)
    return lin(g.op("Mul", g.op("Gelu", gate, approximate="tanh"), up), f"{prefix}.{e}.down_proj",
               _Expert(w["down_proj"], e))  # [rows, H]


def experts(g: Graph, quant: Quant, h: str, weights: str, ids: str, w: Weights, top_k: int, hidden: int,
            prefix: str) -> str:
    """sum over the k slots of weight * down(gelu_tanh(gate(h)) * up(h)) with the slot's expert: [1, S, H].
    `h`: the pre_feedforward_layernorm_2 output [1, S, H]; `w`: the layer's `experts` weights.

    Each expert runs on the rows of the tokens that chose it, none for most of them: a decode step reads k
    experts' weights, a verify call the union of its tokens' experts.
    Each token's sum runs over its experts in ascending order for every call length, so a verify row computes
    a decode row's bits.
    """
    quant = expert_quant(quant)
    n_experts = w["gate_up_proj"].shape[0]
    inter = w["down_proj"].shape[2]
    call = _Call(g, h, weights, ids, hidden, inter, top_k, n_experts, paired=quant.kind != "fp32")
    out = g.op("Concat", *(_expert(g, call, quant, w, e, prefix) for e in range(n_experts)), axis=0)  # [P, H]
    y = g.op("Mul", g.op("Gather", out, call.position, axis=0), call.weights)  # [S*k, H], slot order
    slots = g.op("Split", g.op("Reshape", y, g.const([-1, top_k, hidden])), axis=1, num_outputs=top_k,
                 out=top_k)  # k x [S, 1, H]
    acc = slots[0]
    for s in slots[1:]:
        acc = g.op("Add", acc, s)
    return g.op("Reshape", acc, g.const([1, -1, hidden]))

"""Gemma 4's mixture-of-experts block (26B-A4B) as standard ONNX ops plus MatMulNBits.

Routing, as transformers' Gemma4TextRouter computes it: the layer's residual input, RMS-normalized without
scale, times `router.scale` and hidden^-1/2, projected to one score per expert; softmax over all experts;
top-k; the k probabilities renormalized to sum to 1, then times `per_expert_scale` of the chosen experts.

Dispatch (`experts`): a binary tree of If nodes over the expert ids whose leaves are the experts, each with
its own weights (gate_up [2I, H], down [H, I]) as constants of its branch. A branch runs only if one of the
call's tokens chose an expert below it, so a decode step reads k of the E experts of each layer and a verify
call of S tokens the union of theirs. Why this shape, measured on onnxruntime 1.32 CPU at 26B-A4B width:
- MatMulNBits is fast only with constant weights it has pre-packed (~0.1 ms an expert); given weights as a
  runtime value (gathered from a stacked tensor) it dequantizes them to fp32 first (~3.7 ms), as
  GatherBlockQuantized + MatMul did (8.8-14.5x the roofline of the bytes a decode step reads).
- Weights are pre-packed only when they are initializers of the subgraph their node is in, not of an
  enclosing graph, so the stacked [E, N, K] tensor becomes E per-expert tensors, one per leaf.
- A Loop body would do the same, but onnxruntime then keeps each weight's original bytes mapped beside the
  packed copy (RSS 2x the weights); If branches do too, so the runtime drops those pages after loading
  (runtime/memory.py). The tree is also cheaper than a Loop: nothing runs per iteration.

Why not com.microsoft QMoE/MoE: onnxruntime's CPU kernels offer relu/gelu/silu/swiglu, and GELU-tanh(gate)*up
("geglu"), which Gemma 4's experts compute, only on CUDA; nor do they take a per-expert output scale.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edgegen.export.onnx_graph import Graph
from edgegen.export.quantize import Linears, Quant
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


def _ranges(lo: int, hi: int) -> list[tuple[int, int]]:
    """The expert ranges of the dispatch tree below [lo, hi) (both halves of every range wider than one)."""
    if hi - lo < 2:
        return []
    mid = (lo + hi) // 2
    return [(lo, mid), *_ranges(lo, mid), (mid, hi), *_ranges(mid, hi)]


class _Call:
    """What the experts of one MoE block read from the enclosing graph: the rows, the chosen ids and weights
    flattened token-major, and for each range of the dispatch tree whether a token chose an expert in it."""

    def __init__(self, g: Graph, h: str, weights: str, ids: str, hidden: int, top_k: int, n_experts: int):
        from onnx import TensorProto

        self.top_k = top_k
        self.x = g.op("Reshape", h, g.const([-1, hidden]))  # [S, H]
        self.ids = g.op("Reshape", ids, g.const([-1]))  # [S*k]
        self.weights = g.op("Reshape", weights, g.const([-1]))
        self.zero_row = g.weight(f"moe.zero_row.{hidden}", np.zeros((1, hidden), np.float32))  # shared by layers
        ranges = _ranges(0, n_experts)
        cover = np.zeros((n_experts, len(ranges)), np.float32)  # expert e lies in range j
        for j, (a, b) in enumerate(ranges):
            cover[a:b, j] = 1
        onehot = g.op("Cast", g.op("Equal", g.op("Unsqueeze", self.ids, g.const([1])),
                                   g.const(np.arange(n_experts)[None, :])), to=TensorProto.FLOAT)
        present = g.op("ReduceMax", onehot, g.const([0]), keepdims=1)  # [1, E]: 1 where some token chose e
        cover = g.weight(f"moe.ranges.{n_experts}", cover)  # one copy for all layers
        hit = g.op("Greater", g.op("MatMul", present, cover), g.const(np.float32(0), np.float32))
        parts = g.op("Split", g.op("Reshape", hit, g.const([-1])), axis=0, num_outputs=len(ranges), out=len(ranges))
        self.chosen = dict(zip(ranges, parts, strict=True))  # range -> [1] bool


def _expert(g: Graph, call: _Call, quant: Quant, w: Weights, e: int, acc: str, prefix: str) -> str:
    """acc + weight * down(gelu_tanh(gate(x)) * up(x)) for the tokens that chose expert `e`, in their rows.
    `g` is the If branch that runs only if some token chose `e`: its weights are the branch's own
    initializers, so onnxruntime pre-packs them, and a call reads them only when it runs the expert."""
    slots = g.op("Reshape", g.op("NonZero", g.op("Equal", call.ids, g.const(np.int64(e)))), g.const([-1]))  # [m]
    tokens = g.op("Div", slots, g.const(np.int64(call.top_k)))
    rows = g.op("Gather", call.x, tokens, axis=0)  # [m, H]
    # MatMulNBits computes a lone row on another kernel path than rows in pairs (int8 and fp32 compute, at
    # blocks > 32), and a row in a pair the same whatever the other rows: an odd count gets a zero row, so a
    # token gets the same bits from an expert in a decode step (m=1) as in a verify call (export/row_exact.py).
    paired = quant.kind != "fp32"
    if paired:
        m = g.op("Shape", slots)
        rows = g.op("Concat", rows, g.op("Slice", call.zero_row, g.const([0]), g.op("Mod", m, g.const([2]))), axis=0)
    lin = Linears(g, quant)
    both = lin(rows, f"{prefix}.{e}.gate_up_proj", _Expert(w["gate_up_proj"], e))
    inter = w["down_proj"].shape[2]
    gate, up = g.op("Split", both, g.const([inter, inter]), axis=-1, out=2)
    y = lin(g.op("Mul", g.op("Gelu", gate, approximate="tanh"), up), f"{prefix}.{e}.down_proj",
            _Expert(w["down_proj"], e))  # [m, H]
    if paired:
        y = g.op("Slice", y, g.const([0]), m)
    y = g.op("Mul", y, g.op("Unsqueeze", g.op("Gather", call.weights, slots, axis=0), g.const([-1])))
    return g.op("ScatterND", acc, g.op("Unsqueeze", tokens, g.const([-1])), y, reduction="add")


def _subtree(g: Graph, call: _Call, quant: Quant, w: Weights, lo: int, hi: int, acc: str, prefix: str) -> str:
    """acc plus the outputs of the chosen experts in [lo, hi), added in ascending expert order: each half is
    an If that runs only if a token chose an expert in it."""
    if hi - lo == 1:
        return _expert(g, call, quant, w, lo, acc, prefix)
    mid = (lo + hi) // 2
    for a, b in ((lo, mid), (mid, hi)):
        run, skip = g.branch(f"{prefix}.{a}-{b}"), g.branch(f"{prefix}.{a}-{b}.skip")
        done = _subtree(run, call, quant, w, a, b, acc, prefix)
        acc = g.op("If", call.chosen[(a, b)], then_branch=run.body([done]),
                   else_branch=skip.body([skip.op("Identity", acc)]))
    return acc


def experts(g: Graph, quant: Quant, h: str, weights: str, ids: str, w: Weights, top_k: int, hidden: int,
            prefix: str) -> str:
    """sum over the k slots of weight * down(gelu_tanh(gate(h)) * up(h)) with the slot's expert: [1, S, H].
    `h`: the pre_feedforward_layernorm_2 output [1, S, H]; `w`: the layer's `experts` weights.

    A binary tree of If nodes over the expert ids: a range's branch runs only if one of the call's tokens chose
    an expert in it, and each expert is a leaf holding its own weights as MatMulNBits (or fp32 MatMul)
    constants. A decode step runs k leaves (~k log2(E) Ifs), a verify call the union of its tokens' experts.
    The sum per token runs in expert order for every call length, so a verify row computes a decode row's bits.
    """
    quant = expert_quant(quant)
    n_experts = w["gate_up_proj"].shape[0]
    call = _Call(g, h, weights, ids, hidden, top_k, n_experts)
    acc = g.op("Mul", call.x, g.const(np.float32(0), np.float32))
    acc = _subtree(g, call, quant, w, 0, n_experts, acc, prefix)
    return g.op("Reshape", acc, g.const([1, -1, hidden]))

"""Graph pieces that compute each row of a target call independently of the call's other rows.

Greedy speculative decoding equals plain decoding only if a position's logits and K/V rows are the same
bits whether it is computed alone (decode) or as one of k+1 rows (verify). Measured on onnxruntime 1.32
CPU (benchmarks/row_exactness.py): MatMulNBits (every accuracy level), MatMul and GroupQueryAttention take
a different path for one row than for several, so decode feeds at least two rows (runtime: the target's
`min_rows`); among calls of two or more rows they are row-exact, except GroupQueryAttention with a local
window once the context passes the window: which rows of the key range it sums over depends on the call's
rows. `window_bias` expresses the sliding window as an additive mask instead, so GroupQueryAttention runs
over [0, T) for every row.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgegen.export.onnx_graph import Graph

I64 = TensorProto.INT64


def window_bias(g: Graph, positions: str, total: str, window: int) -> str:
    """Additive attention bias [1, 1, S, T]: 0 where key j is visible from query position p (j <= p, and
    j > p - window when window > 0), else -inf. positions [1, S] int64; total: scalar int32."""
    t = g.op("Cast", total, to=I64)
    p = g.op("Reshape", positions, g.const([1, 1, -1, 1]))
    j = g.op("Reshape", g.op("Range", g.const(0), t, g.const(1)), g.const([1, 1, 1, -1]))
    seen = g.op("LessOrEqual", j, p)
    if window:
        seen = g.op("And", seen, g.op("Greater", j, g.op("Sub", p, g.const(window))))
    return g.op("Where", seen, g.const(np.float32(0), np.float32), g.const(np.float32(-np.inf), np.float32))


CHUNK = 128  # no wider than MLAS's smallest K block: one chunk's dot product is never split


def row_exact_scores(g: Graph, q: str, keys: str, head_dim: int) -> str:
    """q [1, kv, group, S, d] . keys [1, kv, 1, T, d]^T -> scores [1, kv, group, S, T], row-exact.

    MLAS's SGEMM splits the inner dimension into blocks whose size it picks from the output width (here
    T, the number of keys, or a thread's share of it), and sums each block separately: one MatMul over
    d = 256 or 512 rounds a score differently at T = 29 than at T = 33. Dot products of 128 never split,
    and the partial scores are added here, elementwise, always in the same order.
    """
    if head_dim <= CHUNK:
        return g.op("MatMul", q, g.op("Transpose", keys, perm=[0, 1, 2, 4, 3]))
    total = None
    for c in range(0, head_dim, CHUNK):
        start, end, axis = g.const([c]), g.const([min(c + CHUNK, head_dim)]), g.const([-1])
        part = g.op("MatMul", g.op("Slice", q, start, end, axis),
                    g.op("Transpose", g.op("Slice", keys, start, end, axis), perm=[0, 1, 2, 4, 3]))
        total = part if total is None else g.op("Add", total, part)
    return total


def window_start(g: Graph, query_positions: str, window: int) -> str:
    """[1] int64: the first key a sliding layer needs for these queries, rounded down to a multiple of CHUNK.

    Attention-weighted values are summed by MLAS in blocks of 128 keys counted from the first key it is
    given; starting at a multiple of 128 keeps every key in the same block whichever call computes the
    row (the keys between the two starts have weight 0 and add nothing)."""
    lowest = g.op("ReduceMin", g.op("Reshape", query_positions, g.const([-1])), keepdims=1)
    start = g.op("Max", g.op("Sub", lowest, g.const([window - 1])), g.const([0]))
    return g.op("Mul", g.op("Div", start, g.const([CHUNK])), g.const([CHUNK]))

"""Attention pieces that compute each query row independently of the call's other rows (Profile.row_exact).

Greedy speculative decoding equals plain decoding only if a position's logits and K/V rows are the same
bits whether it is computed alone (decode) or as one of k+1 rows (verify). Measured on onnxruntime 1.32
CPU (benchmarks/row_exactness.py): row-wise ops and MatMulNBits with int8 compute (accuracy_level 4) are
row-exact; GroupQueryAttention is not (its one-row path differs, and past the sliding window so do rows of
multi-row calls); MatMulNBits with fp32 compute takes another path for one row than for several. The
standard-op attention is row-exact once its two MatMuls never see a call-dependent blocking: MLAS sums
q.k over the head dim in blocks whose size follows the number of keys, and sums probs.v over the keys in
blocks of 128 counted from the first key it is given.
"""

from __future__ import annotations

from edgegen.export.onnx_graph import Graph

CHUNK = 128  # no wider than MLAS's smallest K block: one chunk's dot product is never split


def key_chunks(g: Graph, keys: str, head_dim: int) -> list[str]:
    """keys [1, kv, T, d] -> its head-dim chunks of CHUNK, transposed [1, kv, c, T], for row_exact_scores.
    Computed once per buffer: every layer that reads the buffer (KV-shared layers) uses the same chunks."""
    chunks = []
    for c in range(0, head_dim, CHUNK):
        part = keys if head_dim <= CHUNK else g.op("Slice", keys, g.const([c]), g.const([min(c + CHUNK, head_dim)]),
                                                    g.const([-1]))
        chunks.append(g.op("Transpose", part, perm=[0, 1, 3, 2]))
    return chunks


def row_exact_scores(g: Graph, q: str, chunks: list[str]) -> str:
    """q [1, kv, rows, d] . keys^T -> scores [1, kv, rows, T], row-exact; `chunks`: key_chunks(keys).

    MLAS's SGEMM splits the inner dimension into blocks whose size it picks from the output width (here
    T, the number of keys, or a thread's share of it), and sums each block separately: one MatMul over
    d = 256 or 512 rounds a score differently at T = 29 than at T = 33. Dot products of 128 never split,
    and the partial scores are added here, elementwise, always in the same order.
    """
    if len(chunks) == 1:
        return g.op("MatMul", q, chunks[0])
    total = None
    for i, keys_t in enumerate(chunks):
        start, end, axis = g.const([i * CHUNK]), g.const([(i + 1) * CHUNK]), g.const([-1])
        part = g.op("MatMul", g.op("Slice", q, start, end, axis), keys_t)
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

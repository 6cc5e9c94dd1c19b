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
ROW_EXACT = dataclasses.replace(PROFILES["cpu"], standard_attention=True, row_exact=True)


class Attention:
    """One standard-op attention layer over an in-place [1, 1, MAX_CTX, d] K/V buffer pair."""

    def __init__(self, tmp, d: int, sliding: bool, threads: int):
        layer = LayerPlan(0, "sliding_attention" if sliding else "full_attention", d, 1, False, 0)
        shared = WeightFile(tmp / "shared.weights")
        g = Graph("attn", tmp, shared, profile=ROW_EXACT)
        q, k, v = (g.input(n, F32, [1, "S", w]) for n, w in (("q", HEADS * d), ("k", d), ("v", d)))
        g.input("position_ids", I64, [1, "S"])
        g.input("total_sequence_length", I32, [])
        shape = [1, 1, "max_context", d]
        for name in ("past_key", "past_value"):
            g.input(name, F32, shape)
        q, k, v = (g.op("Reshape", t, g.const([1, -1, n, d])) for t, n in ((q, HEADS), (k, 1), (v, 1)))
        keys = _scatter_rows(g, "past_key", k, "present_key", layer)
        values = _scatter_rows(g, "past_value", v, "present_value", layer)
        g.output(_standard_attention(g, q, keys, values, layer, HEADS, WINDOW, "position_ids"), "attn", F32)
        g.outputs += [helper.make_tensor_value_info(n, F32, shape) for n in ("present_key", "present_value")]
        g.save(tmp)
        g.data.close()
        shared.close()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(tmp / "attn.onnx"), so, providers=["CPUExecutionProvider"])
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, MAX_CTX, d), np.float32)) for _ in "kv"]

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

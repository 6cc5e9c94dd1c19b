"""The cpu profile's cheaper formulations compute the same bits as the plain ones they replace.

- q/k/v (and gate/up) projections as one MatMulNBits over stacked weights, split after
  (Profile.fused_projections), against one MatMulNBits each, for both compute modes and 1 and 5 rows;
- RoPE as x*cos + swap_halves(x)*signed_sin (graphs.rope_by_gather) against graphs.apply_rope;
- RoPE as one RotaryEmbedding (graphs.rope_by_op, the cpu profile's): not the same bits as apply_rope (its
  kernel rounds x1*cos - x2*sin its own way), but as close to float64 and a row's bits independent of the call;
- StackedRows, the lazy tensor that stacks the projections' weights for export.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from edgegen.export.graphs import PROFILES, apply_rope, rope_by_gather, rope_by_op
from edgegen.export.onnx_graph import Graph, WeightFile
from edgegen.export.quantize import Linears, Quant
from edgegen.export.weights import ArrayTensor, StackedRows

F32 = TensorProto.FLOAT


def run(tmp, build, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    """Build a graph with `build(g)` (which declares inputs and returns output names), run it once."""
    shared = WeightFile(tmp / "shared.weights")
    g = Graph("g", tmp, shared, profile=PROFILES["cpu"])
    for name, value in zip(outputs, build(g), strict=True):
        g.output(value, name, F32)
    g.save(tmp)
    g.data.close()
    shared.close()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(tmp / "g.onnx"), so, providers=["CPUExecutionProvider"]).run(outputs, feeds)


@pytest.mark.parametrize("accuracy_level", [4, 0])
@pytest.mark.parametrize("rows", [1, 5])
def test_fused_projection_columns_are_the_separate_projections_bits(tmp_path, accuracy_level: int, rows: int):
    rng = np.random.default_rng(0)
    k, widths = 512, (1024, 128, 128)
    parts = [ArrayTensor(rng.standard_normal((n, k), dtype=np.float32) * 0.05) for n in widths]
    x = rng.standard_normal((1, rows, k), dtype=np.float32)

    def build(g):
        g.input("x", F32, [1, "S", k])
        lin = Linears(g, Quant("int4", 32, accuracy_level))
        apart = [lin("x", f"p{i}", p) for i, p in enumerate(parts)]
        fused = g.op("Split", lin("x", "stacked", StackedRows(parts)), g.const(list(widths)), axis=-1, out=3)
        return apart + fused

    out = run(tmp_path, build, {"x": x}, [f"apart{i}" for i in range(3)] + [f"fused{i}" for i in range(3)])
    for i in range(3):
        assert out[i].shape == (1, rows, widths[i])
        np.testing.assert_array_equal(out[3 + i], out[i])


@pytest.mark.parametrize("d", [256, 512])
def test_rope_by_gather_is_apply_ropes_bits(tmp_path, d: int):
    rng = np.random.default_rng(1)
    s, heads = 7, 8
    x = rng.standard_normal((1, s, heads, d), dtype=np.float32)
    freqs = np.arange(100, 100 + s, dtype=np.float32)[:, None] * (10000.0 ** -np.arange(0, 1, 2 / d, dtype=np.float32))
    emb = np.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
    feeds = {"x": x, "cos": np.cos(emb).astype(np.float32), "sin": np.sin(emb).astype(np.float32)}

    def build(g):
        g.input("x", F32, [1, s, heads, d])
        g.input("cos", F32, [1, s, 1, d])
        g.input("sin", F32, [1, s, 1, d])
        memo: dict = {}
        rope = rope_by_gather(memo)
        return [apply_rope(g, "x", "cos", "sin"), rope(g, "x", "cos", "sin", d, heads),
                rope(g, "x", "cos", "sin", d, heads)]

    plain, gathered, again = run(tmp_path, build, feeds, ["plain", "gathered", "again"])
    np.testing.assert_array_equal(gathered, plain)
    np.testing.assert_array_equal(again, plain)  # the memoized signed sin and swap index are reused


@pytest.mark.parametrize("d", [256, 512])
def test_rope_by_op_rows_are_exact_and_as_accurate_as_apply_rope(tmp_path, d: int):
    rng = np.random.default_rng(3)
    s, heads = 7, 4
    x = rng.standard_normal((1, s, heads, d), dtype=np.float32)
    # Gemma 4's full layers rotate only part of the head: the rest has frequency 0 (cos 1, sin 0)
    inv_freq = (10000.0 ** -np.arange(0, 1, 2 / d, dtype=np.float32)) * (np.arange(d // 2) < d // 8)
    freqs = (np.arange(300, 300 + s, dtype=np.float32)[:, None] * inv_freq.astype(np.float32))[None]
    half = {"cos": np.cos(freqs).astype(np.float32), "sin": np.sin(freqs).astype(np.float32)}
    full = {k: np.concatenate([v, v], axis=-1)[:, :, None, :] for k, v in half.items()}

    def build(g):
        g.input("x", F32, [1, "S", heads, d])
        g.input("cos", F32, [1, "S", d // 2])
        g.input("sin", F32, [1, "S", d // 2])
        g.input("cos4", F32, [1, "S", 1, d])
        g.input("sin4", F32, [1, "S", 1, d])
        return [rope_by_op(g, "x", "cos", "sin", d, heads), apply_rope(g, "x", "cos4", "sin4")]

    def call(lo: int, hi: int, sub):
        feeds = {"x": x[:, lo:hi], **{k: v[:, lo:hi] for k, v in half.items()},
                 **{k + "4": v[:, lo:hi] for k, v in full.items()}}
        return run(sub, build, feeds, ["op", "plain"])

    op, plain = call(0, s, tmp_path)
    x64 = x.astype(np.float64)
    exact = x64 * full["cos"] + np.concatenate([-x64[..., d // 2:], x64[..., : d // 2]], -1) * full["sin"]
    assert np.abs(op - exact).max() <= 2 * np.abs(plain - exact).max()  # the same rounding error, give or take
    np.testing.assert_array_equal(op[..., d // 8: d // 2], x[..., d // 8: d // 2])  # unrotated dims pass
    np.testing.assert_array_equal(op[..., d // 2 + d // 8:], x[..., d // 2 + d // 8:])
    for i, (lo, hi) in enumerate(((0, 1), (3, 4), (2, 7))):  # one row, another, a verify-sized call
        sub = tmp_path / str(i)
        sub.mkdir()
        np.testing.assert_array_equal(call(lo, hi, sub)[0], op[:, lo:hi])


def test_stacked_rows_reads_rows_across_parts():
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal((n, 6), dtype=np.float32) for n in (5, 3, 4)]
    stacked = StackedRows([ArrayTensor(a) for a in arrays])
    whole = np.concatenate(arrays)
    assert stacked.shape == (12, 6)
    np.testing.assert_array_equal(stacked.numpy(), whole)
    for lo, hi in ((0, 12), (2, 7), (5, 8), (4, 5), (11, 12), (7, 7)):
        np.testing.assert_array_equal(stacked[lo:hi], whole[lo:hi])
    with pytest.raises(ValueError, match="differ in width"):
        StackedRows([ArrayTensor(arrays[0]), ArrayTensor(np.zeros((2, 5), np.float32))])

"""What one E2B-shaped projection costs on each onnxruntime CPU matmul path, against the memory bandwidth.

    python benchmarks/matmul_paths.py [--threads 2] [--rows 1,128,512] [--repeats 9]
    python benchmarks/matmul_paths.py --blocks 32,64,128 [--rows 1,2] [--layers 24]   # int4 block sizes

Single-node graphs with random weights, shaped like E2B's double-wide MLP gate+up projection
(K = 1,536 inputs, N = 12,288 outputs), timed interleaved in one run:

- MatMulNBits int4, block 32, accuracy_level 4 (int8 activations): what edgegen's default export computes;
- MatMulNBits int4, block 32, accuracy_level 0 (fp32 activations): `--compute exact`;
- MatMul fp32;
- DynamicQuantizeMatMul with int8 weights (per-column scales): MLAS's u8s8 integer GEMM, the int8 GEMM
  speed a prefill could reach (it reads 8 bits a weight instead of 5, so it is no decode path).

For one row (decode) the figures to read are weights per second and GB/s of weight bytes against the
fp32 GEMV bandwidth measured in the same run (a 256 MB matrix, DRAM). The int4 matrix (12 MB) may fit in
the last-level cache, so its one-row rate is the kernel's own speed: when that is below DRAM bandwidth,
decode with these kernels is compute-bound, not memory-bound. For many rows (prefill chunks) read GOPS
(2·M·K·N per call). Fastest of the repeats, since the machine may be shared; `uptime` before and after.

`--blocks` times MatMulNBits int4 (accuracy_level 4) at each block size instead, on `--layers` such matrices in
one graph (24: 340 MB at block 32, far beyond the caches as a decode step's weights are; 1: 14 MB, which the
last-level cache may hold, for the kernel's own speed). It prints GB/s of the bytes
the kernel reads: with int8 activations MLAS repacks each block of B at load into its codes (block/2 bytes),
an fp32 scale and an fp32 block sum (4 + 4 bytes), so 24 bytes per 32 weights at block 32, where llama.cpp's
Q4_0 reads 18 (an fp16 scale). When the GB/s is the same at every block size the kernel is bound by memory and
its time is proportional to those bytes.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N = 1536, 12288


def model(nodes, inits, m: int, k: int, n: int) -> bytes:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=opsets).SerializeToString()


def cases(m: int, rng) -> dict[str, tuple[bytes, int]]:
    """name -> (model, weight bytes) for m rows."""
    out = {}
    for level in (4, 0):
        q = rng.integers(0, 256, (N, K // 32, 16), dtype=np.uint8)
        s = (rng.random(N * K // 32, dtype=np.float32) * 0.01).astype(np.float32)
        node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                                block_size=32, accuracy_level=level)
        out[f"MatMulNBits int4 b32 acc{level}"] = (
            model([node], [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s")], m, K, N),
            q.nbytes + s.nbytes)
    w = rng.standard_normal((K, N), dtype=np.float32)
    out["MatMul fp32"] = (model([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")],
                                m, K, N), w.nbytes)
    w8 = rng.integers(-127, 128, (K, N), dtype=np.int8)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "bs"], ["y"], domain="com.microsoft")
    out["DynamicQuantizeMatMul int8"] = (
        model([node], [numpy_helper.from_array(w8, "w"), numpy_helper.from_array(np.full(N, 0.01, np.float32), "bs")],
              m, K, N), w8.nbytes)
    return out


def block_cases(m: int, blocks: list[int], rng, layers: int) -> dict[str, tuple[bytes, int]]:
    """name -> (model of `layers` int4 matrices [K, N] side by side, bytes MLAS reads) for m rows."""
    out = {}
    for block in blocks:
        nodes, inits = [], []
        for i in range(layers):
            q = rng.integers(0, 256, (N, K // block, block // 2), dtype=np.uint8)
            s = (rng.random(N * K // block, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
            inits += [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(s, f"s{i}")]
            nodes.append(helper.make_node("MatMulNBits", ["x", f"q{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                          K=K, N=N, bits=4, block_size=block, accuracy_level=4))
        nodes.append(helper.make_node("Concat", [f"y{i}" for i in range(layers)], ["y"], axis=1))
        packed = layers * N * (K // block) * (block // 2 + 8)  # codes + fp32 scale + fp32 block sum
        out[f"MatMulNBits int4 b{block} acc4 x{layers}"] = (model(nodes, inits, m, K, N * layers), packed)
    return out


def gemv(rng) -> tuple[bytes, int, int]:
    k = 4096
    n = 256 * (1 << 20) // (4 * k)
    w = rng.standard_normal((k, n), dtype=np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    return model([node], [numpy_helper.from_array(w, "w")], 1, k, n), w.nbytes, k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,128,512")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--blocks", default="", help="int4 block sizes to compare instead, e.g. 32,64,128")
    ap.add_argument("--layers", type=int, default=24, help="--blocks: matrices per graph (24: from DRAM)")
    args = ap.parse_args()
    blocks = [int(b) for b in args.blocks.split(",") if b]
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    rng = np.random.default_rng(0)
    from edgegen.runtime.model import session_options

    so = session_options(args.threads)  # edgegen's (threads spin during a call; README "Thread policy")

    def session(m: bytes):
        return ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])

    bw_model, bw_bytes, bw_k = gemv(rng)
    runs = {"fp32 GEMV 256 MB": (session(bw_model), np.ones((1, bw_k), np.float32), bw_bytes, 1)}
    for m in [int(r) for r in args.rows.split(",")]:
        x = rng.standard_normal((m, K), dtype=np.float32)
        for name, (mod, nbytes) in (block_cases(m, blocks, rng, args.layers) if blocks else cases(m, rng)).items():
            runs[f"{name}, {m} row(s)"] = (session(mod), x, nbytes, m)
    times = {name: [] for name in runs}
    for sess, x, _, _ in runs.values():
        sess.run(None, {"x": x})
    for _ in range(args.repeats):
        for name, (sess, x, _, _) in runs.items():
            t = time.perf_counter()
            sess.run(None, {"x": x})
            times[name].append(time.perf_counter() - t)
    bandwidth = bw_bytes / min(times["fp32 GEMV 256 MB"]) / 1e9
    print(f"{args.threads} threads, K={K} N={N}, fastest of {args.repeats}; fp32 GEMV bandwidth {bandwidth:.1f} GB/s")
    for name, (_, _, nbytes, m) in runs.items():
        if name.startswith("fp32 GEMV"):
            continue
        t = min(times[name])
        gbs = nbytes / t / 1e9
        weights = K * N * (args.layers if blocks else 1)
        print(f"  {name:45s} {1000 * t:8.2f} ms  {weights / t / 1e9:5.1f} G weights/s, {gbs:5.1f} GB/s of weights "
              f"({gbs / bandwidth:.2f}x bandwidth)  {2 * m * weights / t / 1e9:6.1f} GOPS")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()

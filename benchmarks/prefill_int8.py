"""What prefill would cost on onnxruntime's integer GEMM: a bundle's target with int8 weights, measured.

    python benchmarks/prefill_int8.py --bundle BUNDLE [--prompt 512] [--threads 2] [--runs 2]

MatMulNBits with int8 compute (the default export) runs a prefill chunk of 128 rows at roughly fp32-GEMM
speed (benchmarks/matmul_paths.py), while MLAS's u8s8 GEMM (DynamicQuantizeMatMul, int8 weights with one
scale per output column) runs the same shape about 3x faster. This script builds, next to a copy-free
view of BUNDLE (hard links) under --work, a second target graph in which every MatMulNBits is a
DynamicQuantizeMatMul over the same weights (int4 blocks dequantized, requantized to int8 per column;
written once, ~1 byte a weight), then, interleaved in one process:

- time to first token for a `--prompt`-token prompt through Target.forward (128-row chunks, the ring
  buffers' limit) with each graph;
- how far the int8 graph's last-position logits are from the int4 graph's (SQNR, top-1 agreement).

A prototype to size the option (a prefill graph would add ~1.9 GB of int8 weights to an E2B bundle); the
bundle itself is not changed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper


def external(bundle: Path, tensor: onnx.TensorProto) -> np.ndarray:
    info = {e.key: e.value for e in tensor.external_data}
    dtype = {onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.FLOAT: np.float32}[tensor.data_type]
    count = int(np.prod(tensor.dims, dtype=np.int64))
    return np.fromfile(bundle / info["location"], dtype, count, offset=int(info["offset"])).reshape(tuple(tensor.dims))


def _row_quantized_matmul(x: str, w: str, w_scale: str, y: str, base: str) -> list:
    """y = x @ w with x quantized to int8 per row (symmetric, its own scale: max|row| / 127), then an s8s8
    MatMulInteger and both scales applied in float. DynamicQuantizeMatMul quantizes x with one scale for the
    whole call, which outlier rows make coarse."""
    def n(op, inputs, **attrs):
        out = f"{base}.{op.lower()}{len(made)}"
        made.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out
    made: list = []
    amax = n("ReduceMax", [n("Abs", [x]), "prefill_int8.last_axis"], keepdims=1)
    scale = n("Max", [n("Div", [amax, "prefill_int8.127"]), "prefill_int8.tiny"])
    q = n("Cast", [n("Clip", [n("Round", [n("Div", [x, scale])]), "prefill_int8.lo", "prefill_int8.hi"])],
          to=onnx.TensorProto.INT8)
    acc = n("Cast", [n("MatMulInteger", [q, w])], to=onnx.TensorProto.FLOAT)
    made.append(helper.make_node("Mul", [n("Mul", [acc, scale]), w_scale], [y], name=f"{base}.out"))
    return made


def int8_graph(bundle: Path, work: Path, per_row: bool) -> Path:
    """work/target_int8*.onnx: the bundle's target with integer GEMMs in place of MatMulNBits."""
    out = work / ("target_int8_rows.onnx" if per_row else "target_int8.onnx")
    work.mkdir(parents=True, exist_ok=True)
    for f in bundle.iterdir():
        link = work / f.name
        if not link.exists():
            link.hardlink_to(f.resolve())
    if out.is_file():
        return out
    model = onnx.load(str(bundle / "target.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    data_file = out.with_suffix(".weights").name
    data = (work / data_file).open("wb")
    nodes, new_inits, dropped = [], [], set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        if attrs["bits"] != 4:
            raise SystemExit("only int4 bundles are handled")
        w = np.empty((k, n), np.int8)
        col_scales = np.empty(n, np.float32)
        codes_all, scales_all = external(work, inits[node.input[1]]), external(work, inits[node.input[2]])
        scales_all = scales_all.reshape(n, k // block)
        for r in range(0, n, 4096):  # rows of W (output columns) in slices: float temporaries stay small
            codes = codes_all[r:r + 4096].reshape(-1, k // 2)
            codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(-1, k // block, block)
            rows = ((codes.astype(np.float32) - 8) * scales_all[r:r + 4096, :, None]).reshape(-1, k)
            sc = np.abs(rows).max(axis=1) / 127
            sc[sc == 0] = 1
            w[:, r:r + len(rows)] = np.clip(np.rint(rows / sc[:, None]), -127, 127).astype(np.int8).T
            col_scales[r:r + len(rows)] = sc
        base = node.name
        for name, array in ((f"{base}.w8", w), (f"{base}.w8_scale", col_scales)):
            data.write(b"\0" * ((-data.tell()) % 4096))
            offset = data.tell()
            array.tofile(data)
            dtype = onnx.TensorProto.INT8 if array.dtype == np.int8 else onnx.TensorProto.FLOAT
            t = onnx.TensorProto(name=name, data_type=dtype, dims=array.shape)
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_file), ("offset", str(offset)),
                               ("length", str(array.nbytes))):
                t.external_data.add(key=key, value=value)
            new_inits.append(t)
        dropped.update(node.input[1:3])
        if per_row:
            nodes.extend(_row_quantized_matmul(node.input[0], f"{base}.w8", f"{base}.w8_scale", node.output[0], base))
        else:
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [node.input[0], f"{base}.w8", f"{base}.w8_scale"],
                                          list(node.output), name=base, domain="com.microsoft"))
    data.close()
    used = {i for node in nodes for i in node.input}  # the tied table's int4 bytes still feed the embedding gather
    keep = [t for t in model.graph.initializer if t.name not in dropped or t.name in used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    if per_row:
        consts = [np.array(v, np.float32) for v in (127.0, 1e-30, -127.0, 127.0)] + [np.array([-1], np.int64)]
        for name, value in zip(("127", "tiny", "lo", "hi", "last_axis"), consts, strict=True):
            model.graph.initializer.append(onnx.numpy_helper.from_array(value, f"prefill_int8.{name}"))
    onnx.save(model, str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("build/bench/prefill-int8"))
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--variants", default="rows,tensor",
                    help="int8 graphs to compare: rows (activations quantized per row, MatMulInteger), "
                         "tensor (DynamicQuantizeMatMul: one activation scale per call)")
    args = ap.parse_args()
    from edgegen.runtime.model import Bundle, session_options

    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    int4 = Bundle(args.bundle, threads=args.threads, hashes="never")
    bundles = {"int4 MatMulNBits (the bundle)": int4}
    names = {"rows": "int8 per-row MatMulInteger", "tensor": "int8 DynamicQuantizeMatMul"}
    for variant in args.variants.split(","):
        graph = int8_graph(args.bundle, args.work, variant == "rows")
        b = Bundle(args.bundle, threads=args.threads, hashes="never")
        b.target.session = ort.InferenceSession(str(graph), session_options(args.threads))
        bundles[names[variant]] = b
    ids = np.random.default_rng(0).integers(4, int4.manifest.model.vocab_size, args.prompt)
    times, logits = {name: [] for name in bundles}, {}
    for _ in range(args.runs):
        for name, b in bundles.items():
            cache = b.new_cache()
            t = time.perf_counter()
            out, _ = b.target.forward(cache, ids)
            times[name].append(time.perf_counter() - t)
            logits[name] = out[-1].astype(np.float64)
    print(f"{args.bundle}, {args.prompt}-token prompt, {args.threads} threads, {args.runs} interleaved runs each")
    first = next(iter(bundles))
    ref, base = logits[first], min(times[first])
    for name, ts in times.items():
        line = (f"  {name:32s} time to first token {min(ts):6.2f} s fastest ({base / min(ts):.2f}x faster), "
                f"median {statistics.median(ts):.2f} s")
        if name != first:
            sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - logits[name]) ** 2))
            line += f"; last logits vs int4's: SQNR {sqnr:.1f} dB, same argmax {ref.argmax() == logits[name].argmax()}"
        print(line)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()

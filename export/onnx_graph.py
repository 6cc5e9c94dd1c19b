"""A small ONNX graph builder: named values, numpy initializers, one external-data file per graph.

Weights that two graphs share (the tied embedding) are written once, to a shared data file both graphs
reference by offset; `write_models` does that layout so no weight is stored twice in a bundle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 23
MS_DOMAIN = "com.microsoft"
_ALIGN = 4096  # page-aligned offsets let onnxruntime memory-map external data

_DTYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
}


class Graph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.shared: set[str] = set()  # initializer names stored in the bundle's shared data file
        self._count = 0

    # -- values -----------------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int = TensorProto.FLOAT, shape: list | None = None) -> str:
        if value != name:
            self.op("Identity", value, out=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def weight(self, name: str, array: np.ndarray, shared: bool = False) -> str:
        if name not in self.initializers:
            self.initializers[name] = np.array(array, copy=True, order="C")  # keeps 0-d arrays 0-d
            if shared:
                self.shared.add(name)
        return name

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        self._count += 1
        return self.weight(f"const_{self._count}", arr)

    # -- nodes ------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, out: str | list[str] | int | None = None, domain: str = "",
           **attrs) -> str | list[str]:
        self._count += 1
        if isinstance(out, int):
            outs = [f"{op_type.lower()}_{self._count}_{i}" for i in range(out)]
        elif out is None:
            outs = [f"{op_type.lower()}_{self._count}"]
        else:
            outs = [out] if isinstance(out, str) else list(out)
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{self._count}", domain=domain, **attrs)
        )
        return outs[0] if (out is None or isinstance(out, str)) else outs

    def ms(self, op_type: str, *inputs: str, out=None, **attrs):
        return self.op(op_type, *inputs, out=out, domain=MS_DOMAIN, **attrs)

    # -- save ---------------------------------------------------------------------------------------
    def to_model(self, data_file: str, shared_file: str, shared_offsets: dict[str, tuple[int, int]],
                 data_offsets: dict[str, tuple[int, int]]) -> onnx.ModelProto:
        tensors = []
        for name, arr in self.initializers.items():
            t = TensorProto(name=name, data_type=_DTYPES[arr.dtype], dims=arr.shape)
            if name in self.shared:
                loc, (off, length) = shared_file, shared_offsets[name]
            elif name in data_offsets:
                loc, (off, length) = data_file, data_offsets[name]
            else:
                tensors.append(onnx.numpy_helper.from_array(arr, name))
                continue
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", loc), ("offset", str(off)), ("length", str(length))):
                t.external_data.add(key=k, value=v)
            tensors.append(t)
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, tensors)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="edgegen",
        )
        model.ir_version = 10
        return model


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    offsets = {}
    with path.open("wb") as fh:
        for name, arr in arrays.items():
            pad = (-fh.tell()) % _ALIGN
            fh.write(b"\0" * pad)
            offsets[name] = (fh.tell(), arr.nbytes)
            fh.write(arr.tobytes())
    return offsets


def write_models(out_dir: Path, graphs: dict[str, Graph], shared_file: str = "shared.weights",
                 min_external_bytes: int = 1024) -> dict[str, list[str]]:
    """Write `<name>.onnx` + `<name>.weights` per graph and one shared data file.

    Returns {graph name: [files it needs]} for the manifest.
    """
    shared: dict[str, np.ndarray] = {}
    for g in graphs.values():
        for name in g.shared:
            arr = g.initializers[name]
            if name in shared and (shared[name].shape != arr.shape or shared[name].dtype != arr.dtype):
                raise ValueError(f"shared weight {name} differs between graphs")
            shared[name] = arr
    shared_offsets = _write_arrays(out_dir / shared_file, shared) if shared else {}
    files: dict[str, list[str]] = {}
    for gname, g in graphs.items():
        data_file = f"{gname}.weights"
        own = {n: a for n, a in g.initializers.items() if n not in g.shared and a.nbytes >= min_external_bytes}
        data_offsets = _write_arrays(out_dir / data_file, own)
        model = g.to_model(data_file, shared_file, shared_offsets, data_offsets)
        onnx.save(model, str(out_dir / f"{gname}.onnx"))
        files[gname] = [f"{gname}.onnx", data_file] + ([shared_file] if g.shared else [])
    return files

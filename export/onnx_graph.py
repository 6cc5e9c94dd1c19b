"""A small ONNX graph builder whose weights go straight to disk.

Each large initializer is appended to its graph's `<name>.weights` file the moment it is created (large
tables as row blocks), so building a graph holds one weight at a time, never the model. Weights two graphs
share (the tied embedding) are written once, to `shared.weights`, and both graphs reference the same bytes:
no weight is stored twice in a bundle, and a weight already written is not read from the checkpoint again.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 23
MS_DOMAIN = "com.microsoft"
SHARED_FILE = "shared.weights"
_ALIGN = 4096  # page-aligned offsets let onnxruntime memory-map external data
_INLINE_BYTES = 1024  # smaller tensors live inside the .onnx file

_DTYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
}


class WeightFile:
    """An append-only, page-aligned data file; remembers where each tensor went."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = path.open("wb")
        self.entries: dict[str, tuple[int, int, tuple[int, ...], np.dtype]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self.entries:
            _, _, shape, dtype = self.entries[name]
            if shape != array.shape or dtype != array.dtype:
                raise ValueError(f"weight {name} written twice with different shapes")
            return
        self.add_blocks(name, array.shape, array.dtype, [array])

    def add_blocks(self, name: str, shape: tuple[int, ...], dtype, blocks) -> None:
        """A tensor written as consecutive row blocks (an iterable of arrays): a large table never has to
        exist whole in memory."""
        if name in self.entries:
            return
        self._fh.write(b"\0" * ((-self._fh.tell()) % _ALIGN))
        offset = self._fh.tell()
        for block in blocks:
            np.ascontiguousarray(block, dtype=dtype).tofile(self._fh)
        nbytes = self._fh.tell() - offset
        if nbytes != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise ValueError(f"weight {name}: {nbytes} bytes written for shape {shape}")
        self.entries[name] = (offset, nbytes, tuple(shape), np.dtype(dtype))

    def close(self) -> None:
        self._fh.close()


class Graph:
    def __init__(self, name: str, out_dir: Path, shared: WeightFile, data: WeightFile | None = None,
                 profile=None):
        self.name = name
        self.profile = profile  # the execution-provider profile the graph is built for (graphs.Profile)
        # `data`: another graph's weight file, for a graph that reuses its weights (same names, same bytes).
        self.data = data or WeightFile(Path(out_dir) / f"{name}.weights")
        self.file = self.data.path.name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.inline: dict[str, np.ndarray] = {}
        self.shared = shared
        self.shared_names: set[str] = set()
        self.used_data: set[str] = set()
        self._ids = itertools.count(1)  # value and weight names

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
        if shared:
            self.shared.add(name, array)
            self.shared_names.add(name)
        elif array.nbytes >= _INLINE_BYTES:
            self.data.add(name, array)
            self.used_data.add(name)
        elif name not in self.inline:
            self.inline[name] = np.array(array, copy=True, order="C")  # keeps 0-d arrays 0-d
        return name

    def stored(self, name: str, nbytes: int, shared: bool = False) -> bool:
        """Whether a weight of `nbytes` already sits in the file this graph would put it in (another graph
        of the bundle wrote it): then `weight_blocks` only references it and nothing needs to be read."""
        if shared:
            return name in self.shared
        return nbytes >= _INLINE_BYTES and name in self.data

    def weight_blocks(self, name: str, shape: tuple[int, ...], dtype, blocks, shared: bool = False) -> str:
        """`weight` for a tensor produced as row blocks (see WeightFile.add_blocks)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if not shared and nbytes < _INLINE_BYTES:
            return self.weight(name, np.concatenate([np.asarray(b, dtype) for b in blocks]).reshape(shape))
        (self.shared if shared else self.data).add_blocks(name, shape, dtype, blocks)
        (self.shared_names if shared else self.used_data).add(name)
        return name

    def alias(self, name: str, of: str, shape: tuple[int, ...]) -> str:
        """Weight `of` under another name and shape (same bytes, same dtype). An op that needs the weight in
        another shape reads the alias: a Reshape of an initializer would be constant-folded by onnxruntime
        into a copy held in memory (measured: 0.43 GiB per graph for the 26B-A4B's tied embedding)."""
        if of in self.inline:
            self.inline[name] = self.inline[of].reshape(shape)
            return name
        shared = of in self.shared_names
        file = self.shared if shared else self.data
        offset, nbytes, old, dtype = file.entries[of]
        if int(np.prod(shape, dtype=np.int64)) != int(np.prod(old, dtype=np.int64)):
            raise ValueError(f"alias {name}: shape {shape} does not fit weight {of} {old}")
        file.entries.setdefault(name, (offset, nbytes, tuple(shape), dtype))
        (self.shared_names if shared else self.used_data).add(name)
        return name

    def const(self, value, dtype=np.int64) -> str:
        return self.weight(f"const_{next(self._ids)}", np.asarray(value, dtype=dtype))

    # -- nodes ------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, out: str | list[str] | int | None = None, domain: str = "",
           **attrs) -> str | list[str]:
        n = next(self._ids)
        if isinstance(out, int):
            outs = [f"{op_type.lower()}_{n}_{i}" for i in range(out)]
        elif out is None:
            outs = [f"{op_type.lower()}_{n}"]
        else:
            outs = [out] if isinstance(out, str) else list(out)
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{n}", domain=domain, **attrs)
        )
        return outs[0] if (out is None or isinstance(out, str)) else outs

    def ms(self, op_type: str, *inputs: str, out=None, **attrs):
        return self.op(op_type, *inputs, out=out, domain=MS_DOMAIN, **attrs)

    # -- save ---------------------------------------------------------------------------------------
    def _initializers(self) -> list[onnx.TensorProto]:
        tensors = [onnx.numpy_helper.from_array(a, n) for n, a in self.inline.items()]
        refs = [(n, SHARED_FILE, self.shared.entries[n]) for n in sorted(self.shared_names)]
        refs += [(n, self.file, self.data.entries[n]) for n in sorted(self.used_data)]
        for name, location, (offset, length, shape, dtype) in refs:
            t = TensorProto(name=name, data_type=_DTYPES[np.dtype(dtype)], dims=shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=k, value=v)
            tensors.append(t)
        return tensors

    def save(self, out_dir: Path) -> list[str]:
        """Write `<name>.onnx` referencing its data files (close them once every graph is saved); returns
        the files the graph needs."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self._initializers())
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="edgegen",
        )
        model.ir_version = 10
        onnx.save(model, str(Path(out_dir) / f"{self.name}.onnx"))
        return [f"{self.name}.onnx", self.file] + ([SHARED_FILE] if self.shared_names else [])

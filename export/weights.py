"""A checkpoint's tensors, read one at a time (or a block of rows at a time) straight from safetensors files.

Export never holds a whole model: the graph builder asks for a tensor when it writes the graph node that
needs it, gets it as float32, quantizes and writes it, and drops it. Reads are plain file reads of the
tensor's byte range (no memory map: mapped pages of a 9 GB checkpoint would count towards the process's
resident set for as long as the map stays open). bf16 and fp16 are widened to float32 per tensor or row block.

Names are the model's own, without the checkpoint's prefix: the text model of a `Gemma4ForCausalLM`
(`model.`) or of a `Gemma4ForConditionalGeneration` (`model.language_model.`) reads the same way, and the
vision and audio towers of the multimodal layout are never read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgegen.runtime.errors import EdgegenError

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
ROW_BLOCK_BYTES = 64 << 20  # float32 bytes per block when a large table is read by rows


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


def _header(path: Path) -> dict:
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    base = 8 + length
    return {name: _Entry(path, v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for name, v in header.items()}


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":  # bf16 is the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


class Checkpoint:
    """Every tensor of a model directory's `*.safetensors` files, by full name; nothing is read until asked."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.entries: dict[str, _Entry] = {}
        for f in sorted(self.directory.glob("*.safetensors")):
            self.entries.update(_header(f))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def _entry(self, name: str) -> _Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise EdgegenError(f"the checkpoint in '{self.directory}' has no tensor '{name}'; "
                               "is it a complete Gemma 4 checkpoint?") from None

    def _read(self, e: _Entry, start: int, count: int) -> np.ndarray:
        item = np.dtype(_NUMPY[e.dtype]).itemsize
        with e.file.open("rb") as fh:
            fh.seek(e.start + start * item)
            raw = np.fromfile(fh, dtype=_NUMPY[e.dtype], count=count)
        if raw.size != count:
            raise EdgegenError(f"weights '{e.file.name}' are truncated; re-download the model")
        return raw

    def get(self, name: str) -> np.ndarray:
        """The whole tensor: float32 for floating types, its own dtype for integers."""
        e = self._entry(name)
        raw = self._read(e, 0, int(np.prod(e.shape, dtype=np.int64)))
        out = _to_float32(raw, e.dtype) if e.dtype in ("BF16", "F16", "F32", "F64") else raw
        return out.reshape(e.shape)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D float tensor, as float32."""
        e = self._entry(name)
        width = int(np.prod(e.shape[1:], dtype=np.int64))
        stop = min(stop, e.shape[0])
        return _to_float32(self._read(e, start * width, (stop - start) * width), e.dtype).reshape(-1, *e.shape[1:])

    def gather(self, name: str, ids) -> np.ndarray:
        """Rows `ids` (any order, repeats allowed) of a 2-D float tensor, as float32."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((ids.size, *self.shape(name)[1:]), np.float32)
        for i, row in enumerate(ids):
            out[i] = self.rows(name, int(row), int(row) + 1)[0]
        return out


class Tensor:
    """A lazy 2-D (or smaller) float tensor: `.shape`, rows by slicing, `.numpy()` for the whole, in float32."""

    def __init__(self, ckpt: Checkpoint, name: str):
        self.ckpt, self.name, self.shape = ckpt, name, ckpt.shape(name)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("row slices must be contiguous")
        return self.ckpt.rows(self.name, start, stop)

    def numpy(self) -> np.ndarray:
        return self.ckpt.get(self.name)

    def block_rows(self) -> int:
        """Rows per block when the tensor is converted in pieces (about ROW_BLOCK_BYTES of float32)."""
        width = int(np.prod(self.shape[1:], dtype=np.int64)) or 1
        return max(1, ROW_BLOCK_BYTES // (4 * width))


class ArrayTensor:
    """An in-memory array with the same interface as Tensor (weights that are not in a checkpoint)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array, np.float32)
        self.shape = self.array.shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.array[rows]

    def numpy(self) -> np.ndarray:
        return self.array

    def block_rows(self) -> int:
        return max(1, self.shape[0])


class Weights:
    """A model's tensors under a name prefix: `w["self_attn.q_proj.weight"]` is lazy, `w.array(name)` reads.
    `w.sub("layers.3")` narrows the prefix (the graph builder walks layers this way)."""

    def __init__(self, ckpt: Checkpoint, prefix: str = ""):
        self.ckpt, self.prefix = ckpt, prefix

    def sub(self, name: str) -> Weights:
        return Weights(self.ckpt, f"{self.prefix}{name}.")

    def __contains__(self, name: str) -> bool:
        return f"{self.prefix}{name}" in self.ckpt

    def __getitem__(self, name: str) -> Tensor:
        full = f"{self.prefix}{name}"
        self.ckpt._entry(full)
        return Tensor(self.ckpt, full)

    def array(self, name: str) -> np.ndarray:
        return self.ckpt.get(f"{self.prefix}{name}")


def text_prefix(ckpt: Checkpoint) -> str:
    """Where a Gemma 4 target's text model lives in its checkpoint."""
    for prefix in ("model.language_model.", "model."):
        if f"{prefix}embed_tokens.weight" in ckpt:
            return prefix
    raise EdgegenError(f"the target checkpoint in '{ckpt.directory}' has no embed_tokens weight under 'model.' or "
                       "'model.language_model.'; is it a Gemma 4 checkpoint?")


def lm_head(ckpt: Checkpoint) -> Tensor | None:
    """An untied lm_head's weight, or None when the head is the (tied) input embedding."""
    return Tensor(ckpt, "lm_head.weight") if "lm_head.weight" in ckpt else None


# -- writing (random-weight stand-ins of real size are built tensor by tensor) -----------------------------




def write_safetensors(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], fill) -> None:
    """Write a safetensors file whose tensors (name, dtype name, shape) are produced one at a time by
    `fill(name, out)`: `out` is a flat writer taking numpy chunks in order. Only one chunk is in memory."""
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(_NUMPY[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, _dtype, _shape in tensors:
            begin = fh.tell()
            fill(name, lambda chunk: np.ascontiguousarray(chunk).tofile(fh))
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if fh.tell() - begin != expected:
                raise ValueError(f"{name}: wrote {fh.tell() - begin} bytes, expected {expected}")


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


class StackedRows:
    """Several lazy tensors of the same width read as one, their rows one after another (q/k/v or gate/up
    projections exported as one matmul): rows by slicing, `.numpy()` for the whole, in float32."""

    def __init__(self, parts: list):
        widths = {tuple(p.shape[1:]) for p in parts}
        if len(widths) != 1:
            raise ValueError(f"stacked tensors differ in width: {sorted(widths)}")
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("row slices must be contiguous")
        out, offset = [], 0
        for p in self.parts:
            lo, hi = max(start, offset), min(stop, offset + p.shape[0])
            if lo < hi:
                out.append(np.asarray(p[lo - offset : hi - offset], np.float32))
            offset += p.shape[0]
        return np.concatenate(out) if out else np.empty((0, *self.shape[1:]), np.float32)

    def numpy(self) -> np.ndarray:
        return self[:]

    def block_rows(self) -> int:
        return min(p.block_rows() if hasattr(p, "block_rows") else max(1, p.shape[0]) for p in self.parts)

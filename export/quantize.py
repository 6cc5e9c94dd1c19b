"""Weight quantization for the graphs: fp32 MatMul, or block-wise int8/int4 MatMulNBits.

The rounding is ours (symmetric, per block of `block_size` input channels, zero point 2^(bits-1)), so
`dequantize` gives exactly the weights the quantized graph computes with: tests load them into the
PyTorch model and compare like with like. The tied embedding is quantized once and read by both the
lm_head (MatMulNBits) and the token gathers (GatherBlockQuantized), from the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgegen.export.onnx_graph import Graph

QUANT_BITS = {"fp32": 0, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class Quant:
    kind: str = "fp32"  # fp32 | int8 | int4
    block_size: int = 32
    # MatMulNBits compute: 0 = fp32 (matches PyTorch on the same rounding to ~1e-5), 4 = int8 activations
    # (CPU: ~1.5x faster int4 decode and ~2.5x cheaper multi-row verify at E2B shape; not bit-faithful).
    accuracy_level: int = 0

    @property
    def bits(self) -> int:
        return QUANT_BITS[self.kind]

    def block_for(self, k: int) -> int:
        """Largest block size <= block_size that divides k (small test models have odd widths)."""
        b = self.block_size
        while k % b:
            b //= 2
        return max(b, 2)


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (codes uint8 [N, K], scales float32 [N, K/block]); symmetric, zero point 2^(bits-1).

    Works through row chunks so the float temporaries stay small even for a 262k-row lm_head.
    """
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, k // block), np.float32)
    step = max(1, (1 << 22) // k)
    for r in range(0, n, step):
        blocks = np.asarray(w[r : r + step], np.float32).reshape(-1, k // block, block)
        sc = np.abs(blocks).max(axis=-1) / qmax
        sc = np.where(sc == 0, np.float32(1.0), sc).astype(np.float32)
        q = np.clip(np.rint(blocks / sc[..., None]), -qmax - 1, qmax) + 2 ** (bits - 1)
        codes[r : r + step] = q.reshape(-1, k)
        scales[r : r + step] = sc
    return codes, scales


def dequantize(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """The weights a quantized graph effectively uses, for the like-with-like PyTorch reference."""
    codes, scales = quantize_blocks(w, bits, block)
    n, k = w.shape
    centred = codes.reshape(n, k // block, block).astype(np.float32) - 2 ** (bits - 1)
    return (centred * scales[..., None]).reshape(n, k)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [N, K] -> bytes [N, K*bits/8]; 4-bit: low nibble first."""
    if bits == 8:
        return codes
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


class Linears:
    """Emits `y = x @ W.T` for one graph in the configured precision."""

    def __init__(self, g: Graph, quant: Quant):
        self.g, self.quant = g, quant
        self._done: dict[str, tuple[str, str, int]] = {}

    def __call__(self, x: str, name: str, w: np.ndarray) -> str:
        n, k = w.shape
        if self.quant.kind == "fp32":
            return self.g.op("MatMul", x, self.g.weight(name, np.ascontiguousarray(w.T)))
        packed, scales, block = self._packed(name, w)
        return self.g.ms(
            "MatMulNBits", x, packed, scales, K=k, N=n, bits=self.quant.bits, block_size=block,
            accuracy_level=self.quant.accuracy_level,
        )

    def _packed(self, name: str, w: np.ndarray, shared: bool = False) -> tuple[str, str, int]:
        if name in self._done:
            return self._done[name]
        n, k = w.shape
        block = self.quant.block_for(k)
        codes, scales = quantize_blocks(w, self.quant.bits, block)
        data = pack(codes, self.quant.bits).reshape(n, k // block, -1)
        self._done[name] = (
            self.g.weight(f"{name}.qweight", data, shared=shared),
            self.g.weight(f"{name}.scales", scales.reshape(-1), shared=shared),
            block,
        )
        return self._done[name]



class TiedTable:
    """A [vocab, hidden] table read two ways: rows by id (embedding) and as a matrix (lm_head).

    Stored once per graph and, with `shared=True`, once per bundle: both graphs reference the same bytes.
    """

    def __init__(self, g: Graph, quant: Quant, name: str, w: np.ndarray, shared: bool = False):
        self.g, self.quant, self.shape = g, quant, w.shape
        if quant.kind == "fp32":
            self.table, self.scales, self.block = g.weight(f"{name}.weight", w, shared=shared), "", 0
        else:
            self.table, self.scales, self.block = Linears(g, quant)._packed(name, w, shared=shared)

    def rows(self, ids: str, scale: float | None = None) -> str:
        g, (v, h) = self.g, self.shape
        if self.quant.kind == "fp32":
            rows = g.op("Gather", self.table, ids, axis=0)
        else:
            flat = g.op("Reshape", self.table, g.const([v, -1]))
            grid = g.op("Reshape", self.scales, g.const([v, h // self.block]))
            rows = g.ms("GatherBlockQuantized", flat, ids, grid, gather_axis=0, quantize_axis=1,
                        block_size=self.block, bits=self.quant.bits)
        return rows if scale is None else g.op("Mul", rows, g.const(np.float32(scale), np.float32))

    def logits(self, x: str) -> str:
        g, (v, h) = self.g, self.shape
        if self.quant.kind == "fp32":
            return g.op("MatMul", x, g.op("Transpose", self.table, perm=[1, 0]))
        return g.ms("MatMulNBits", x, self.table, self.scales, K=h, N=v, bits=self.quant.bits,
                    block_size=self.block, accuracy_level=self.quant.accuracy_level)

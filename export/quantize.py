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


# Candidate scales of a block, as fractions of the one that puts its largest-magnitude weight on the lowest
# code (-2^(bits-1)); the block keeps the one with the least squared error. Measured on [1408, 2816] matrices
# (relative RMS error of W x, int4), against max|w| / (2^(bits-1) - 1), which leaves the lowest code unused:
# Gaussian weights 0.097 -> 0.083 at block 32, 0.117 -> 0.098 at 128, 0.127 -> 0.104 at 256; Student-t(4)
# 0.131 -> 0.113, 0.192 -> 0.160, 0.229 -> 0.189. More candidates gained < 0.005 and cost export time.
SCALE_CANDIDATES = (0.9, 1.0, 1.1)


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (codes uint8 [N, K], scales float32 [N, K/block]); symmetric, zero point 2^(bits-1).

    A block's scale maps its largest-magnitude weight near the lowest code (the sign of the scale is that
    weight's sign, so either end of the range can take it): the SCALE_CANDIDATES fraction with the least
    squared error over the block. Works through row chunks so the float temporaries stay small even for a
    262k-row lm_head.
    """
    n, k = w.shape
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, k // block), np.float32)
    step = max(1, (1 << 20) // k)
    for r in range(0, n, step):
        rows = np.asarray(w[r : r + step], np.float32)
        blocks = rows.reshape(-1, block)
        peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)[:, 0]
        peak[peak == 0] = 1.0  # an all-zero block: any scale gives zeros
        best, best_err = np.ones_like(peak), np.full_like(peak, np.inf)
        for c in SCALE_CANDIDATES:
            sc = peak / np.float32(low * c)
            q = np.clip(np.rint(blocks / sc[:, None]), low, high)
            err = np.square(q * sc[:, None] - blocks).sum(axis=1)
            better = err < best_err
            best[better], best_err[better] = sc[better], err[better]
        q = np.clip(np.rint(blocks / best[:, None]), low, high) - low
        codes[r : r + step] = q.reshape(rows.shape)
        scales[r : r + step] = best.reshape(len(rows), k // block)
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


def row_blocks(w, rows: int):
    """w's rows in blocks of `rows` as float32 (w: an array, or a lazy checkpoint tensor)."""
    n = w.shape[0]
    for r in range(0, n, rows):
        yield np.asarray(w[r : r + rows], np.float32)


def block_rows(w) -> int:
    """Rows per block when converting `w` in pieces (~64 MB of float32; lazy tensors say their own)."""
    if hasattr(w, "block_rows"):
        return w.block_rows()
    return max(1, (16 << 20) // max(1, int(np.prod(w.shape[1:], dtype=np.int64))))


class Linears:
    """Emits `y = x @ W.T` for one graph in the configured precision. `w` is an array or a lazy checkpoint
    tensor (export/weights.py): it is read only if its bytes are not in the bundle yet, and by row blocks."""

    def __init__(self, g: Graph, quant: Quant):
        self.g, self.quant = g, quant
        self._done: dict[str, tuple[str, str, int]] = {}

    def __call__(self, x: str, name: str, w) -> str:
        n, k = w.shape
        if self.quant.kind == "fp32":
            if self.g.stored(name, n * k * 4):
                return self.g.op("MatMul", x, self.g.weight_blocks(name, (k, n), np.float32, []))
            array = w.numpy() if hasattr(w, "numpy") else np.asarray(w, np.float32)
            return self.g.op("MatMul", x, self.g.weight(name, np.ascontiguousarray(array.T)))
        packed, scales, block = self._packed(name, w)
        return self.g.ms(
            "MatMulNBits", x, packed, scales, K=k, N=n, bits=self.quant.bits, block_size=block,
            accuracy_level=self.quant.accuracy_level,
        )

    def _packed(self, name: str, w, shared: bool = False) -> tuple[str, str, int]:
        if name in self._done:
            return self._done[name]
        n, k = w.shape
        bits = self.quant.bits
        block = self.quant.block_for(k)
        shape = (n, k // block, block * bits // 8)
        qname, sname = f"{name}.qweight", f"{name}.scales"
        g = self.g
        if g.stored(qname, n * k * bits // 8, shared) and g.stored(sname, n * (k // block) * 4, shared):
            self._done[name] = (g.weight_blocks(qname, shape, np.uint8, [], shared),
                                g.weight_blocks(sname, (n * (k // block),), np.float32, [], shared), block)
            return self._done[name]
        scales = np.empty((n, k // block), np.float32)
        done = 0

        def packed_rows():
            nonlocal done
            for rows in row_blocks(w, block_rows(w)):
                codes, sc = quantize_blocks(rows, bits, block)
                scales[done : done + len(sc)] = sc
                done += len(sc)
                yield pack(codes, bits).reshape(-1, *shape[1:])

        blocks = packed_rows()
        if g.stored(qname, n * k * bits // 8, shared):  # only the (inline) scales are missing
            for _ in blocks:
                pass
            blocks = []
        self._done[name] = (g.weight_blocks(qname, shape, np.uint8, blocks, shared),
                            g.weight(sname, scales.reshape(-1), shared=shared), block)
        return self._done[name]


class TiedTable:
    """A [vocab, hidden] table read two ways: rows by id (embedding) and as a matrix (lm_head).

    Stored once per graph and, with `shared=True`, once per bundle: both graphs reference the same bytes.
    `w` is an array or a lazy checkpoint tensor, read by row blocks and only if not stored yet.
    """

    def __init__(self, g: Graph, quant: Quant, name: str, w, shared: bool = False):
        self.g, self.quant, self.shape = g, quant, tuple(w.shape)
        if quant.kind == "fp32":
            self.table = g.weight_blocks(f"{name}.weight", self.shape, np.float32,
                                         [] if g.stored(f"{name}.weight", 4 * int(np.prod(self.shape)), shared)
                                         else row_blocks(w, block_rows(w)), shared=shared)
            self.scales, self.block = "", 0
        else:
            self.table, self.scales, self.block = Linears(g, quant)._packed(name, w, shared=shared)
    def rows(self, ids: str, scale: float | None = None) -> str:
        g, (v, h) = self.g, self.shape
        if self.quant.kind == "fp32":
            rows = g.op("Gather", self.table, ids, axis=0)
        else:
            flat = g.alias(f"{self.table}.rows", self.table, (v, h * self.quant.bits // 8))
            grid = g.alias(f"{self.scales}.rows", self.scales, (v, h // self.block))
            rows = g.ms("GatherBlockQuantized", flat, ids, grid, gather_axis=0, quantize_axis=1,
                        block_size=self.block, bits=self.quant.bits)
        return rows if scale is None else g.op("Mul", rows, g.const(np.float32(scale), np.float32))

    def logits(self, x: str) -> str:
        g, (v, h) = self.g, self.shape
        if self.quant.kind == "fp32":
            return g.op("MatMul", x, g.op("Transpose", self.table, perm=[1, 0]))
        return g.ms("MatMulNBits", x, self.table, self.scales, K=h, N=v, bits=self.quant.bits,
                    block_size=self.block, accuracy_level=self.quant.accuracy_level)

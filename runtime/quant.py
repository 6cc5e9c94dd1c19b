"""Host-side dequantization of block-quantized rows (the per-layer embedding table)."""

from __future__ import annotations

import numpy as np


def dequantize_rows(codes: np.ndarray, scales: np.ndarray, bits: int, block: int) -> np.ndarray:
    """codes uint8 [n, K*bits/8], scales float32 [n, K/block] -> float32 [n, K]; zero point 2^(bits-1)."""
    if bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(codes.shape[0], -1)
    n, k = codes.shape
    centred = codes.reshape(n, k // block, block).astype(np.float32) - 2 ** (bits - 1)
    return (centred * scales[..., None]).reshape(n, k)

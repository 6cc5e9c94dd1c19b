"""The target's KV cache: one preallocated buffer pair per non-shared layer, updated in place.

`length` is the number of positions whose K/V are valid. Rolling back rejected drafts is `trim`: the
rows past `length` are garbage that the next step overwrites, never copied or cleared.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgegen.runtime.manifest import KVBuffer


class KVCache:
    def __init__(self, buffers: list[KVBuffer], max_context: int):
        self.max_context = max_context
        self.length = 0
        self.values: dict[str, ort.OrtValue] = {}
        for b in buffers:
            for name in (b.name, b.name.replace("past_key", "past_value")):
                shape = (1, b.kv_heads, max_context, b.head_dim)
                self.values[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))

    def trim(self, length: int) -> None:
        """Keep positions [0, length); later rows will be overwritten."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot trim a cache of {self.length} positions to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape())) * 4 for v in self.values.values())

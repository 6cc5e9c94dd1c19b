"""The target's KV cache: one preallocated buffer pair per non-shared layer, updated in place.

`length` is the number of positions whose K/V are valid. Rolling back rejected drafts is `trim`: the
rows past `length` are garbage that the next step overwrites, never copied or cleared.

A buffer holds max_context rows (position p at row p) or, for sliding layers, a ring of R slots (position p
at slot p mod R; the graphs mask each slot by the position it holds). A ring keeps what its layer can see,
the last `window` positions, only if no call writes more than R - window rows (`max_rows`: Target.forward
splits longer calls) and no rollback goes back further than the ring still holds (`reusable`).

Buffers are np.zeros: the OS commits their pages when a row is first written, so a fresh cache costs
little resident memory and grows as the context fills, up to `nbytes`.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgegen.runtime.manifest import KVBuffer, value_buffer


def rows_of(buffer: KVBuffer, max_context: int) -> int:
    return buffer.length if isinstance(buffer.length, int) else max_context


def cache_bytes(buffers: list[KVBuffer], max_context: int) -> int:
    """Bytes of the K and V buffers a cache of `max_context` positions allocates."""
    return sum(2 * b.kv_heads * rows_of(b, max_context) * b.head_dim * np.dtype(b.dtype).itemsize for b in buffers)


class KVCache:
    # Class defaults, so that caches with their own layout (runtime/qnn.py) need not set them.
    max_rows = 0  # rows one call may write (ring buffers: R - window), 0: no limit
    rewind = 1 << 62  # how far behind the highest written position a rollback may go (ring: R - window)
    written = 0  # one past the highest position any call wrote (rows past `length` included)

    def __init__(self, buffers: list[KVBuffer], max_context: int, window: int = 0):
        """window: the sliding window, which ring buffers must keep (the manifest's sliding_window)."""
        self.max_context = max_context
        self.length = 0
        self.values: dict[str, ort.OrtValue] = {}
        self.arrays: dict[str, np.ndarray] = {}  # the memory behind each OrtValue (shared, not a copy)
        self.ring: dict[str, int] = {}  # buffer name -> ring length (0: max_context rows)
        for b in buffers:
            rings = isinstance(b.length, int)
            for name in (b.name, value_buffer(b.name)):
                self.arrays[name] = np.zeros((1, b.kv_heads, rows_of(b, max_context), b.head_dim), b.dtype)
                self.values[name] = ort.OrtValue.ortvalue_from_numpy(self.arrays[name])
                self.ring[name] = b.length if rings else 0
        rings = [r for r in self.ring.values() if r]
        if rings:
            self.max_rows = self.rewind = min(rings) - window

    def inputs(self, graph) -> dict[str, ort.OrtValue]:
        """The buffers `graph` (model.GraphSession) takes, bound as they are: the graph updates them in place."""
        return {name: value for name, value in self.values.items() if name in graph.input_names}

    def trim(self, length: int) -> None:
        """Keep positions [0, length); later rows will be overwritten."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot trim a cache of {self.length} positions to {length}")
        if self.reusable(length) != length:
            raise ValueError(f"cannot trim a cache of {self.length} positions to {length}: its ring buffers "
                             f"no longer hold the window before it (reusable({length}) is the longest prefix)")
        self.length = length

    def reusable(self, length: int) -> int:
        """The longest prefix of [0, length) this cache can resume from: `length`, or 0 when ring buffers have
        overwritten rows of the window before it (a rollback more than R - window rows behind the highest
        position written; speculative rollbacks never are, a chat turn that rewrites a long answer can be)."""
        return length if length >= self.written - self.rewind else 0

    def wrote(self, end: int) -> None:
        """A call wrote rows up to position `end` - 1 (Target._run)."""
        self.written = max(self.written, end)

    def write(self, name: str, rows: np.ndarray, start: int = 0) -> None:
        """Put K or V rows [1, kv_heads, n, head_dim] for positions start..start+n-1 where the graphs read them
        (a ring keeps the last R). For tests and verification, which fill a cache from a reference."""
        buf, ring, end = self.arrays[name], self.ring[name], start + rows.shape[2]
        positions = np.arange(start, end)
        if ring:
            positions, rows = positions[-ring:], rows[:, :, -ring:]
        buf[:, :, positions % ring if ring else positions] = rows
        self.wrote(end)

    def reset(self) -> None:
        self.length = 0
        self.written = 0  # slots written before read as negative positions (masked) until rewritten

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

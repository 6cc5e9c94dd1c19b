"""Resident memory a loaded bundle does not need: mapped weight bytes onnxruntime has already copied.

onnxruntime memory-maps a graph's external weight files (their offsets are page-aligned, export/onnx_graph.py)
and pre-packs MatMulNBits weights into its own buffers. For weights of the main graph it then releases the
mapped original; for initializers of subgraphs (If and Loop bodies) it does not, so
their original pages stay resident beside the packed copy and are never read again: RSS ~2x the weights
(measured on onnxruntime 1.32 at 26B-A4B width). `release_mapped` drops this process's resident pages of the
bundle's weight files once its sessions exist. Only file-backed pages are dropped: a weight that is still read
(a gathered embedding row, say) comes back from the page cache on its next read, as after any eviction.

Linux and Android (/proc/self/smaps, madvise); elsewhere both functions do nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable
from pathlib import Path

_MADV_DONTNEED = 4  # Linux: drop the range's pages; file-backed ones are re-read from the file on access
_SMAPS = "/proc/self/smaps"


def _mappings(files: Iterable[Path]) -> list[tuple[int, int, int, int]]:
    """(start, end, resident bytes, anonymous bytes) of this process's mappings of `files`."""
    wanted = {os.path.realpath(f) for f in files}
    out, current = [], None
    try:
        with open(_SMAPS) as fh:
            for line in fh:
                head = line.split(None, 5)
                if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                    path = head[5].strip() if len(head) == 6 else ""
                    start, end = (int(x, 16) for x in head[0].split("-"))
                    current = [start, end, 0, 0] if path in wanted else None
                    if current is not None:
                        out.append(current)
                elif current is not None and head[0] in ("Rss:", "Anonymous:"):
                    current[2 if head[0] == "Rss:" else 3] = int(head[1]) * 1024
    except OSError:
        return []
    return [tuple(m) for m in out]


def mapped_resident(files: Iterable[Path]) -> int:
    """Bytes of `files` resident in this process through its mappings of them."""
    return sum(rss for _, _, rss, _ in _mappings(files))


def release_mapped(files: Iterable[Path]) -> int:
    """Drop this process's resident pages of its mappings of `files`; returns the bytes that were resident.
    A mapping holding pages written in place (copy-on-write, not file data) is left as it is."""
    if not sys.platform.startswith("linux"):
        return 0
    mappings = [m for m in _mappings(files) if m[2] and not m[3]]
    if not mappings:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for start, end, rss, _ in mappings:
        if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
            dropped += rss
    return dropped


def weight_files(bundle: Path) -> list[Path]:
    """The external weight files of a bundle's graphs (export/onnx_graph.py: `<graph>.weights`)."""
    return sorted(Path(bundle).glob("*.weights"))

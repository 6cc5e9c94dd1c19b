"""Checks that run before anything in a bundle is opened: an app may load a bundle it did not build.

1. Containment. Every file the manifest names (graphs, PLE table, tokenizer, chat template, the file list)
   and every external-data location inside the ONNX graphs must be a plain relative path that stays in
   the bundle directory once symlinks are resolved. ONNX graphs are read as raw protobuf (the runtime
   has no `onnx` package), without touching their weights.
2. Integrity. Every file the manifest lists has the size (always checked) and the sha256 recorded at
   export. Hashing streams 1 MiB at a time; a file whose hash matched is remembered in the user cache by
   (device, inode, size, mtime, change time), so a multi-GB bundle is hashed once, not on every load.
   Writing to a file moves its change time (POSIX ctime, Windows ChangeTime), which a user cannot set
   back, so a later change is always re-hashed. Where the change time cannot be read, nothing is
   remembered and every load hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

from edgegen.runtime import osinfo
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.manifest import Manifest

_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_NESTING = 64  # subgraphs inside subgraphs: deeper than any real model, shallow enough for recursion


def inside(bundle: Path, name: object, what: str) -> Path:
    """`bundle / name`, refusing a name that is absolute, climbs out with `..` or leads out via a symlink."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise EdgegenError(f"{what} {name!r} in '{bundle}' is not a file name; the bundle is damaged, re-export it")
    parts = PurePosixPath(name).parts
    if (PurePosixPath(name).is_absolute() or "\\" in name or PureWindowsPath(name).drive or ".." in parts):
        raise EdgegenError(f"{what} '{name}' points outside the bundle '{bundle}'; refusing to load this bundle")
    path = bundle / name
    root = bundle.resolve()
    real = path.resolve()
    if real != root and root not in real.parents:
        raise EdgegenError(f"{what} '{name}' in '{bundle}' is a link to '{real}', outside the bundle; "
                           "refusing to load this bundle")
    return path


# -- ONNX external data, read from the protobuf wire format ------------------------------------------------


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _Malformed
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one message; length-delimited values are sub-views, never copies."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise _Malformed
        if i > n:
            raise _Malformed
        yield field, value


def _tensor_external(tensor: memoryview) -> dict[str, str] | None:
    """A TensorProto's external_data entries (field 13) if its data_location (14) is EXTERNAL."""
    entries, location = {}, 0
    for field, value in _fields(tensor):
        if field == 13:
            kv = {f: bytes(v).decode("utf-8", "replace") for f, v in _fields(value) if f in (1, 2)}
            entries[kv.get(1, "")] = kv.get(2, "")
        elif field == 14:
            location = value
    return entries if location == _EXTERNAL or entries else None


def _graph_tensors(graph: memoryview, depth: int) -> Iterator[memoryview]:
    """Every TensorProto a GraphProto holds: initializers, sparse ones, and constants in node attributes,
    including those of nested subgraphs."""
    if depth > _MAX_NESTING:
        raise _Malformed
    for field, value in _fields(graph):
        if field == 5:  # initializer
            yield value
        elif field == 15:  # sparse_initializer: values (1), indices (2)
            yield from (v for f, v in _fields(value) if f in (1, 2))
        elif field == 1:  # node
            yield from _node_tensors(value, depth)


def _node_tensors(node: memoryview, depth: int) -> Iterator[memoryview]:
    for field, attribute in _fields(node):
        if field != 5:
            continue
        for f, v in _fields(attribute):
            if f in (5, 10):  # t, tensors
                yield v
            elif f in (22, 23):  # sparse_tensor(s)
                yield from (x for g, x in _fields(v) if g in (1, 2))
            elif f in (6, 11):  # g, graphs
                yield from _graph_tensors(v, depth + 1)


def external_locations(model_bytes: bytes) -> list[dict[str, str]]:
    """The external_data entries of every tensor in a serialized ModelProto (graph 7, functions 25)."""
    out = []
    buf = memoryview(model_bytes)
    for field, value in _fields(buf):
        tensors: Iterator[memoryview] = iter(())
        if field == 7:
            tensors = _graph_tensors(value, 0)
        elif field == 25:  # FunctionProto: node (7)
            tensors = (t for f, n in _fields(value) if f == 7 for t in _node_tensors(n, 0))
        for tensor in tensors:
            entries = _tensor_external(tensor)
            if entries is not None:
                out.append(entries)
    return out


def check_external_data(bundle: Path, graph_file: str, listed: dict[str, dict]) -> None:
    """Refuse a graph whose weights live outside the bundle or in a file the manifest does not vouch for."""
    path = inside(bundle, graph_file, "graph file")
    try:
        entries = external_locations(path.read_bytes())
    except (_Malformed, RecursionError):
        raise EdgegenError(f"'{graph_file}' in '{bundle}' is not a valid ONNX model; re-export the bundle") from None
    for entry in entries:
        location = entry.get("location", "")
        inside(bundle, location, f"external data of '{graph_file}'")
        if location not in listed:
            raise EdgegenError(f"'{graph_file}' reads weights from '{location}', which the manifest does not list; "
                               "the bundle is damaged, re-export it")
        try:
            end = int(entry.get("offset") or 0) + int(entry.get("length") or 0)
        except ValueError:
            raise EdgegenError(f"'{graph_file}' has a malformed external-data entry; re-export the bundle") from None
        if end > listed[location]["bytes"]:
            raise EdgegenError(f"'{graph_file}' reads past the end of '{location}'; re-export the bundle")


# -- sizes and sha256 ------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cache_file() -> Path:
    root = os.environ.get("EDGEGEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgegen")
    return Path(root) / "verified.json"


def _identity(path: Path, st: os.stat_result) -> str | None:
    changed = osinfo.change_time_ns(path, st)
    if changed is None:
        return None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{changed}"


def _load_verified() -> dict[str, str]:
    try:
        data = json.loads(_cache_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_verified(verified: dict[str, str]) -> None:
    """Best effort: a read-only home only means hashing again next time."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(verified), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def check_files(bundle: Path, files: dict[str, dict], hashes: str = "cached") -> None:
    """Sizes always; sha256 per `hashes`: "cached" (once per file change), "always" or "never"."""
    verified = _load_verified() if hashes == "cached" else {}
    changed = False
    for name, info in files.items():
        path = inside(bundle, name, "listed file")
        try:
            st = path.stat()
        except OSError:
            raise EdgegenError(f"bundle file '{name}' is missing from '{bundle}'; re-export or re-copy the bundle"
                               ) from None
        if st.st_size != info["bytes"]:
            raise EdgegenError(f"bundle file '{name}' in '{bundle}' has {st.st_size} bytes, the manifest says "
                               f"{info['bytes']}; the file is damaged or truncated, re-copy or re-export the bundle")
        if hashes == "never":
            continue
        key, identity = str(path.resolve()), _identity(path, st)
        if identity is not None and verified.get(key) == f"{identity}:{info['sha256']}":
            continue
        if sha256_file(path) != info["sha256"]:
            raise EdgegenError(f"bundle file '{name}' in '{bundle}' does not match its sha256 in the manifest; "
                               "the file is damaged or was changed, re-copy or re-export the bundle")
        if identity is not None:
            verified[key] = f"{identity}:{info['sha256']}"
            changed = True
    if changed and hashes == "cached":
        _save_verified(verified)


def check_bundle(path: Path, m: Manifest, hashes: str = "cached") -> None:
    """Everything the manifest names stays inside the bundle and is listed with its size and sha256; the
    listed files are intact. Runs before any session, table or tokenizer is opened."""
    if hashes not in ("cached", "always", "never"):
        raise EdgegenError(f"hashes={hashes!r} is invalid; use 'cached', 'always' or 'never'")
    named = {spec.file: f"graph '{name}'" for name, spec in m.graphs.items()}
    if m.model.ple:
        named.update({f: "per-layer embedding table" for f in (m.model.ple.file, m.model.ple.scales_file) if f})
    named.update({f: "tokenizer file" for f in m.tokenizer.get("files", [])})
    if m.tokenizer.get("chat_template"):
        named[m.tokenizer["chat_template"]] = "chat template"
    for name, what in named.items():
        inside(path, name, what)
        if name not in m.files:
            raise EdgegenError(f"{what} '{name}' is not listed with a size and sha256 in the manifest of '{path}'; "
                               "re-export the bundle")
    check_files(path, m.files, hashes)
    for spec in m.graphs.values():
        check_external_data(path, spec.file, m.files)

"""edgegen: Gemma 4 speculative decoding with the MTP assistant, on ONNX Runtime.

`edgegen.export` (torch, transformers) writes bundles; `edgegen.runtime` (numpy, onnxruntime) runs them.
The names here are imported lazily so `import edgegen` never pulls in torch.
"""

from __future__ import annotations

from pathlib import Path as _Path

_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "runtime" / "manifest.py").is_file():
    # A source checkout on sys.path (e.g. `python -m edgegen` in the repo root) shadows the editable
    # install's mapping; resolve edgegen.export / edgegen.runtime to their folders as pyproject does.
    __path__.append(str(_root))

__all__ = ["EdgegenError", "export_bundle", "ExportOptions", "Generator"]


def __getattr__(name: str):
    if name == "EdgegenError":
        from edgegen.runtime.errors import EdgegenError

        return EdgegenError
    if name in ("export_bundle", "ExportOptions"):
        from edgegen.export import bundle

        return getattr(bundle, name)
    if name == "Generator":
        from edgegen.runtime.generate import Generator

        return Generator
    raise AttributeError(f"module 'edgegen' has no attribute {name!r}")

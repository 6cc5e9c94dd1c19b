"""edgegen: Gemma 4 speculative decoding with the MTP assistant, on ONNX Runtime.

`edgegen.export` (torch, transformers) writes bundles; `edgegen.runtime` (numpy, onnxruntime) runs them.
The names here are imported lazily so `import edgegen` never pulls in torch.
"""

from __future__ import annotations

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

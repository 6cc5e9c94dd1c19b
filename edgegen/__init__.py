"""edgegen: Gemma 4 speculative decoding with the MTP assistant, on ONNX Runtime.

`edgegen.export` (torch, transformers) writes bundles; `edgegen.runtime` (numpy, onnxruntime) runs them.
The names here are imported lazily so `import edgegen` never pulls in torch.
"""

from __future__ import annotations

from pathlib import Path as _Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgegen.runtime.generate import Generator

_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "runtime" / "manifest.py").is_file():
    # A source checkout on sys.path (e.g. `python -m edgegen` in the repo root) shadows the editable
    # install's mapping; resolve edgegen.export / edgegen.runtime to their folders as pyproject does.
    __path__.append(str(_root))

__all__ = ["load", "Generator", "Sampling", "Bundle", "EdgegenError", "export_bundle", "ExportOptions"]

# name -> module it lives in; imported on first use (PEP 562), so the runtime names never load torch.
_LAZY = {
    "Generator": "edgegen.runtime.generate",
    "Sampling": "edgegen.runtime.sampling",
    "Bundle": "edgegen.runtime.model",
    "EdgegenError": "edgegen.runtime.errors",
    "export_bundle": "edgegen.export.bundle",
    "ExportOptions": "edgegen.export.bundle",
}


def load(path: str | _Path | None = None, ep: str = "cpu", threads: int | None = None,
         draft_tokens: int | str = "auto", **bundle_options) -> Generator:
    """A `Generator` for the bundle at `path`; None is the bundled demo pair, as for `edgegen run`
    (exported into the cache on first use, which needs the exporter).

    ep: cpu, qnn, webgpu, openvino or auto. threads: per session (None: onnxruntime's choice).
    draft_tokens: "auto" (chosen each round) or a fixed count. `bundle_options` go to `Bundle`:
    strict=True (every node on the EP), hashes="cached" | "always" | "never", spin=False (idle threads sleep
    instead of spinning during a call: for a machine whose cores are busy with other work).
    """
    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle

    if path is None:
        from edgegen.demo import demo_bundle

        path = demo_bundle()
    return Generator(Bundle(path, threads=threads, ep=ep, **bundle_options), draft_tokens=draft_tokens)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgegen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

"""The bundled demo pair (models/demo): a small trained Gemma 4 target and its distilled assistant.

`edgegen run` without a bundle uses it; the first use exports it (fp32, verified) into a cache directory
keyed by the pair's content, and later runs reuse that bundle.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from edgegen.runtime.errors import EdgegenError

REPO = Path(__file__).resolve().parent.parent
DEMO_PAIR = REPO / "models" / "demo"


def _fingerprint(pair: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(pair.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(pair).as_posix().encode())
            h.update(str(f.stat().st_size).encode())
            h.update(f.read_bytes()[:1 << 16])
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    root = os.environ.get("EDGEGEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgegen")
    return Path(root)


def demo_bundle() -> Path:
    target, assistant = DEMO_PAIR / "target", DEMO_PAIR / "assistant"
    if not (target / "config.json").is_file() or not (assistant / "config.json").is_file():
        raise EdgegenError(f"the demo pair is missing from '{DEMO_PAIR}'; pass a bundle directory instead")
    out = cache_dir() / f"demo-{_fingerprint(DEMO_PAIR)}"
    if (out / "manifest.json").is_file():
        return out
    try:
        from edgegen.export.bundle import ExportOptions, export_bundle
    except ImportError:
        raise EdgegenError("the demo pair is exported on first use, which needs the exporter: "
                           "pip install 'edgegen[export]'") from None
    print(f"exporting the demo pair to {out} (first use) ...", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_bundle(str(target), str(assistant), out, ExportOptions(max_context=2048))
    return out

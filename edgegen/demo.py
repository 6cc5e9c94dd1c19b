"""The bundled demo pair (models/demo): exported to a bundle on first use."""

from __future__ import annotations

from pathlib import Path

from edgegen.runtime.errors import EdgegenError

REPO = Path(__file__).resolve().parent.parent
DEMO_PAIR = REPO / "models" / "demo"


def demo_bundle() -> Path:
    raise EdgegenError("no bundle given and the demo pair is not built yet; pass a bundle directory")

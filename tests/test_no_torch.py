"""The runtime never imports torch or transformers (docs/architecture.md, "Layout": what lets an
app embed it).

Each check runs in a fresh interpreter whose first act is to install an import blocker for torch,
transformers and optimum; any attempt to import them is recorded and fails. The blocked process must still
load a bundle, decode speculatively and print the same tokens as this (unblocked) process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgegen.runtime.generate import Generator

BLOCKER = """
import importlib.abc, sys
BLOCKED = ("torch", "transformers", "optimum")
attempts = []

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} is blocked: the runtime must not import it")
        return None

sys.meta_path.insert(0, Blocker())
assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), "imported before the blocker"

def report():
    return {"attempts": attempts, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}
"""

PROMPT = [2, 40, 41, 42, 43, 44, 45]


@pytest.fixture(scope="module")
def bundle(bundle_dir) -> Path:
    return bundle_dir("e2b-like")


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_blocker_really_blocks() -> None:
    proc = run_blocked("import torch\n")
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


def test_runtime_generates_without_torch(bundle: Path) -> None:
    code = f"""
import json
import edgegen
from edgegen.runtime.generate import Generator
from edgegen.runtime.sampling import Sampling
gen = Generator({str(bundle)!r})
out = {{}}
for k in (4, 3):  # the fused draft_round graph, then single assistant steps
    gen.reset()
    result = gen.generate({PROMPT!r}, max_new_tokens=5, draft_tokens=k)
    out[f"greedy{{k}}"], out[f"drafted{{k}}"] = result.token_ids, result.stats.drafted
gen.reset()
sampled = gen.generate("hello there", max_new_tokens=5, sampling=Sampling(temperature=1.0, seed=3))
print(json.dumps({{**out, "sampled": sampled.token_ids, **report()}}))
"""
    proc = run_blocked(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["attempts"] == [] and out["loaded"] == []
    assert out["drafted4"] > 0 and out["drafted3"] > 0  # the drafter graphs ran
    gen = Generator(bundle)
    assert out["greedy4"] == out["greedy3"] == gen.generate(PROMPT, max_new_tokens=5).token_ids
    assert len(out["greedy4"]) == 5 or out["greedy4"][-1] in gen.eos_ids
    assert out["sampled"]


def test_cli_run_without_torch(bundle: Path) -> None:
    code = f"""
import json
sys.argv = ["edgegen", "run", {str(bundle)!r}, "-p", "hi", "-n", "3", "--json"]
from edgegen.cli import main
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code or 0
print(json.dumps(report()), file=sys.stderr)
sys.exit(code)
"""
    proc = run_blocked(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == {"attempts": [], "loaded": []}
    assert 1 <= len(json.loads(proc.stdout)["token_ids"]) <= 3


def test_public_api_load_without_torch(bundle: Path) -> None:
    """`import edgegen` and `edgegen.load(path)` (the README's way in) stay on the runtime's imports."""
    code = f"""
import json
import edgegen
names = [n for n in ("Generator", "Sampling", "Bundle", "EdgegenError") if getattr(edgegen, n, None)]
gen = edgegen.load({str(bundle)!r}, threads=1)
result = gen.generate({PROMPT!r}, max_new_tokens=5, sampling=edgegen.Sampling(temperature=1.0, seed=3))
try:
    edgegen.load({str(bundle)!r}, ep="nope")
    bad = None
except edgegen.EdgegenError as exc:
    bad = str(exc)
print(json.dumps({{"names": names, "ids": result.token_ids, "bad": bad, **report()}}))
"""
    proc = run_blocked(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["attempts"] == [] and out["loaded"] == []
    assert out["names"] == ["Generator", "Sampling", "Bundle", "EdgegenError"]
    assert 1 <= len(out["ids"]) <= 5 and "unknown" in out["bad"]


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multimodal bundle (target graph with soft tokens + vision graph), exported without verification."""
    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.export.testing import save_multimodal_pair

    target, assistant = save_multimodal_pair(tmp_path_factory.mktemp("mm-pair"))
    out = tmp_path_factory.mktemp("mm") / "bundle"
    export_bundle(str(target), str(assistant), out, ExportOptions(max_context=256, verify=False))
    return out


def test_images_run_without_torch(image_bundle: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(image)
    code = f"""
import json
from edgegen.runtime.generate import Generator
gen = Generator({str(image_bundle)!r})
result = gen.generate("Describe <|image|> in", max_new_tokens=5, images=[{str(image)!r}], draft_tokens=3)
print(json.dumps({{"ids": result.token_ids, **report()}}))
"""
    proc = run_blocked(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["attempts"] == [] and out["loaded"] == []
    expected = Generator(image_bundle).generate("Describe <|image|> in", 5, images=[image], use_assistant=False)
    assert out["ids"] == expected.token_ids

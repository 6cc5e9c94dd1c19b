"""Shared fixtures: synthetic Gemma 4 pairs written to disk once per session.

Tests go through the real loading path (config.json + safetensors), so the pairs are real checkpoint
directories; building one takes a fraction of a second, writing it once keeps the suite fast.
"""

from __future__ import annotations

import os

# Before transformers is imported anywhere: no test may reach the network, and its warnings are noise here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

PairDirs = tuple[Path, Path]


@pytest.fixture(scope="session")
def pair_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., PairDirs]:
    """`pair_dir(preset, centroid_head=True, conditional=False) -> (target_dir, assistant_dir)`.

    Each distinct pair is written once per session; tests that corrupt one must copy it first.
    """
    from edgegen.export.testing import save_pair

    cache: dict[tuple[str, bool, bool], PairDirs] = {}

    def make(preset: str, centroid_head: bool = True, conditional: bool = False) -> PairDirs:
        key = (preset, centroid_head, conditional)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{preset}-centroid{int(centroid_head)}-cond{int(conditional)}")
            cache[key] = save_pair(out, preset, seed=0, centroid_head=centroid_head, conditional=conditional)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def bundle_dir(pair_dir, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`bundle_dir(preset, centroid_head=True, quant="fp32", assistant_quant=None, max_context=512,
    kv_dtype="fp32", compute="exact") -> Path`.

    Quantized bundles compute exactly by default here: they are verified at export, and these random tiny
    models amplify any rounding (int8 weights alone: 7-20 dB against fp32), so int8 activations score 12-23 dB
    against the same-rounding reference, under the export's 25 dB bar for int8 compute (trained demo pair:
    45 dB; the E2B stand-in: 32 dB). int8 compute is tested with a trained pair and in test_row_exact.py.

    Exported (and verified) once per session; tests must not modify the returned bundle.
    """
    from edgegen.export.bundle import ExportOptions, export_bundle

    cache: dict[tuple, Path] = {}

    def make(preset: str, centroid_head: bool = True, quant: str = "fp32", assistant_quant: str | None = None,
             max_context: int = 512, kv_dtype: str = "fp32", compute: str = "exact") -> Path:
        key = (preset, centroid_head, quant, assistant_quant, max_context, kv_dtype, compute)
        if key not in cache:
            target, assistant = pair_dir(preset, centroid_head)
            name = f"{preset}-c{int(centroid_head)}-{quant}-{assistant_quant}-{max_context}-{kv_dtype}-{compute}"
            out = tmp_path_factory.mktemp("bundles") / name
            options = ExportOptions(quant=quant, assistant_quant=assistant_quant, max_context=max_context,
                                    kv_dtype=kv_dtype, compute=compute)
            export_bundle(str(target), str(assistant), out, options)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def gemma4_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Gemma 4 tokenizer files (the package's copy: export/data/gemma4), laid out like a bundle's."""
    from edgegen.export.testing import write_gemma4_tokenizer

    out = tmp_path_factory.mktemp("gemma4-tokenizer")
    write_gemma4_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def mm_pair(tmp_path_factory: pytest.TempPathFactory) -> PairDirs:
    """The multimodal preset (testing.save_multimodal_pair: vision and audio towers, processor files)."""
    from edgegen.export.testing import save_multimodal_pair

    return save_multimodal_pair(tmp_path_factory.mktemp("multimodal"))


@pytest.fixture(scope="session")
def mm_bundle(mm_pair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multimodal preset exported (fp32, verified: vision and audio graphs) once per session; tests must
    not modify it."""
    from edgegen.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("mm-bundle") / "bundle"
    export_bundle(str(mm_pair[0]), str(mm_pair[1]), out, ExportOptions(max_context=512))
    return out

"""NaN or inf logits are detected and reported as one line, never turned into tokens.

Broken bundles are made the way a bad checkpoint would make them: a graph's weight file is overwritten
with NaN (its size and sha256 relisted, so the bundle looks intact and only the numbers are wrong).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.generate import Generator
from edgegen.runtime.integrity import sha256_file
from edgegen.runtime.manifest import MANIFEST
from edgegen.runtime.sampling import Sampling

PROMPT = [2, 17, 42, 99, 5]


def poisoned(good: Path, dst: Path, weights: str) -> Path:
    bundle = Path(shutil.copytree(good, dst))
    path = bundle / weights
    np.full(path.stat().st_size // 4, np.nan, np.float32).tofile(path)
    raw = json.loads((bundle / MANIFEST).read_text())
    raw["files"][weights] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (bundle / MANIFEST).write_text(json.dumps(raw))
    return bundle


@pytest.fixture(scope="module")
def good(bundle_dir) -> Path:
    return bundle_dir("e2b-like")


@pytest.fixture(scope="module")
def nan_target(good: Path, tmp_path_factory) -> Path:
    return poisoned(good, tmp_path_factory.mktemp("nan") / "target", "target.weights")


@pytest.fixture(scope="module")
def nan_assistant(bundle_dir, tmp_path_factory) -> Path:
    """A plain lm_head drafter: its NaN logits come out of the graph. (A centroid head's NaN scores already
    break the graph's own gather, which is reported as a failed run of the assistant graph.)"""
    return poisoned(bundle_dir("e2b-like", centroid_head=False), tmp_path_factory.mktemp("nan") / "assistant",
                    "assistant.weights")


@pytest.fixture(scope="module")
def nan_centroid_assistant(good: Path, tmp_path_factory) -> Path:
    return poisoned(good, tmp_path_factory.mktemp("nan") / "centroid", "assistant.weights")


def collect(events) -> tuple[list[int], EdgegenError | None]:
    """Tokens yielded before the stream raised, and the error."""
    tokens = []
    try:
        for event in events:
            tokens.append(event.token_id)
    except EdgegenError as exc:
        return tokens, exc
    return tokens, None


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.8, seed=1)], ids=["greedy", "sampled"])
@pytest.mark.parametrize("use_assistant", [True, False], ids=["speculative", "plain"])
def test_nan_target_gives_no_token(nan_target: Path, sampling: Sampling, use_assistant: bool) -> None:
    gen = Generator(nan_target, draft_tokens=4)
    tokens, err = collect(gen.stream_ids(PROMPT, 8, sampling, use_assistant))
    assert tokens == [] and err is not None
    assert "target graph produced NaN or inf" in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.8, seed=1)], ids=["greedy", "sampled"])
@pytest.mark.parametrize("draft_tokens", [4, 2], ids=["fused-round", "step-by-step"])
def test_nan_assistant_is_reported_not_drafted(nan_assistant: Path, sampling: Sampling, draft_tokens: int) -> None:
    gen = Generator(nan_assistant, draft_tokens=draft_tokens)
    tokens, err = collect(gen.stream_ids(PROMPT, 8, sampling))
    # The first token comes from the (healthy) target's prefill; the first draft round then fails.
    assert len(tokens) == 1 and err is not None
    assert "assistant graph produced NaN or inf" in str(err) and "--no-assistant" in str(err)
    gen.reset()
    assert len(gen.generate(PROMPT, 8, sampling, use_assistant=False).token_ids) == 8  # the target alone works


@pytest.mark.parametrize("draft_tokens", [4, 2], ids=["fused-round", "step-by-step"])
def test_nan_centroid_assistant_stops_with_one_line(nan_centroid_assistant: Path, draft_tokens: int) -> None:
    gen = Generator(nan_centroid_assistant, draft_tokens=draft_tokens)
    tokens, err = collect(gen.stream_ids(PROMPT, 8))
    assert len(tokens) == 1 and err is not None and "\n" not in str(err)
    assert "assistant graph produced NaN" in str(err) or "draft_round.onnx' failed" in str(err) or \
        "assistant.onnx' failed" in str(err)


def test_inf_or_nan_mid_stream_stops_before_the_bad_token(good: Path, monkeypatch) -> None:
    """Logits that turn non-finite on the 3rd target call: the tokens before are emitted, none after."""
    gen = Generator(good, draft_tokens=0)
    expected = gen.generate(PROMPT, 8, use_assistant=False).token_ids
    for bad in (np.inf, -np.inf, np.nan):
        gen.reset()
        real = type(gen.bundle.target).forward
        calls = []

        def forward(self, cache, ids, logits_to_keep=1, soft=None, pad_id=0, real=real, bad=bad, calls=calls):
            logits, hidden = real(self, cache, ids, logits_to_keep, soft, pad_id)
            calls.append(1)
            if len(calls) == 3:
                logits = logits.copy()
                logits[-1, 7] = bad
            return logits, hidden

        monkeypatch.setattr(type(gen.bundle.target), "forward", forward)
        tokens, err = collect(gen.stream_ids(PROMPT, 8, use_assistant=False))
        monkeypatch.undo()
        assert tokens == expected[:2] and err is not None and "NaN or inf" in str(err)


@pytest.mark.parametrize("which", ["target", "assistant"])
def test_cli_reports_nan_in_one_line_and_prints_no_token(which: str, nan_target: Path, nan_assistant: Path) -> None:
    bundle = nan_target if which == "target" else nan_assistant
    proc = subprocess.run([sys.executable, "-m", "edgegen", "run", str(bundle), "-p", "hello", "--draft-tokens", "4",
                           "--json"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stdout == ""  # --json prints only a finished result
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the {which} graph produced NaN or inf"), proc.stderr

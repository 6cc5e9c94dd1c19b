"""`edgegen export` as a user runs it: every bad input is one line on stderr, and nothing is left behind.

Each case runs the real CLI in a subprocess and checks: a non-zero exit, `error: ...` as the only line on
stderr, no traceback, and an OUT parent that holds no bundle and no `.OUT.partial-*` temp dir. Interrupts:
Ctrl-C mid-export cleans up; SIGKILL cannot, but leaves only a hidden partial dir that a rerun ignores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

PairDir = Callable[..., tuple[Path, Path]]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TIMEOUT_S = 300


def _args(target: Path, assistant: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgegen", "export", "--target", str(target), "--assistant", str(assistant),
            "--out", str(out), "--max-context", "512", *extra]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)


def _default_sigint() -> None:
    # A child of a non-interactive shell may inherit SIGINT ignored; Python only turns SIGINT into
    # KeyboardInterrupt when it starts with the default handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    """A running export; stdout (the progress display) is dropped so a full pipe can never stall it."""
    return subprocess.Popen(args, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def _wait_for_partial(proc: subprocess.Popen, out: Path) -> None:
    """Block until the export has created its temp dir beside OUT (so it is past loading, mid-export)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not _partials(out):
        if proc.poll() is not None:
            pytest.fail(f"export ended ({proc.returncode}) before its temp dir existed: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("export never created its temp dir")
        time.sleep(0.02)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def outs(tmp_path: Path) -> Path:
    """An empty parent for OUT: whatever a failed export leaves behind shows up here."""
    path = tmp_path / "outs"
    path.mkdir()
    return path


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


# -- bad inputs: each returns (target, assistant, fragments the message must contain) ----------------------


def _not_gemma(t: Path, a: Path, tmp: Path, pair_dir: PairDir):
    llama = tmp / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (llama / "model.safetensors").write_bytes(b"\0" * 64)
    return llama, a, ("'llama'", "not a Gemma 4 model")


def _swapped(t: Path, a: Path, tmp: Path, pair_dir: PairDir):
    return a, t, ("gemma4_assistant", "target first")


def _mismatched(t: Path, a: Path, tmp: Path, pair_dir: PairDir):
    other = pair_dir("e4b-like")[1]
    assistant_value = _config(other)["backbone_hidden_size"]
    target_value = _config(t)["hidden_size"]
    assert assistant_value != target_value
    return t, other, ("mismatched pair", f"{assistant_value} != {target_value}")


def _missing_dir(t: Path, a: Path, tmp: Path, pair_dir: PairDir):
    return tmp / "no-such-model", a, ("no-such-model", "does not exist")


def _no_safetensors(t: Path, a: Path, tmp: Path, pair_dir: PairDir):
    target = _copy(t, tmp / "target")
    (target / "model.safetensors").unlink()
    return target, a, ("target", "no .safetensors")


def _corrupt(t: Path, a: Path, tmp: Path, pair_dir: PairDir):
    target = _copy(t, tmp / "target")
    weights = target / "model.safetensors"
    weights.write_bytes(os.urandom(weights.stat().st_size))
    return target, a, ("model.safetensors", "corrupt")


def _truncated(t: Path, a: Path, tmp: Path, pair_dir: PairDir):
    target = _copy(t, tmp / "target")
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target, a, ("model.safetensors", "truncated")


BAD_INPUTS = {
    "target is not gemma 4": _not_gemma,
    "target and assistant swapped": _swapped,
    "e4b assistant for an e2b target": _mismatched,
    "missing target dir": _missing_dir,
    "target without model.safetensors": _no_safetensors,
    "corrupt safetensors": _corrupt,
    "truncated safetensors": _truncated,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_model_input(case: str, pair_dir: PairDir, tmp_path: Path, outs: Path) -> None:
    target, assistant, fragments = BAD_INPUTS[case](*pair_dir("e2b-like"), tmp_path, pair_dir)
    _assert_one_line_error(_run(_args(target, assistant, outs / "bundle"), tmp_path), *fragments)
    assert list(outs.iterdir()) == []


def test_block_size_not_a_power_of_two(pair_dir: PairDir, tmp_path: Path, outs: Path) -> None:
    proc = _run(_args(*pair_dir("e2b-like"), outs / "bundle", "--block-size", "48"), tmp_path)
    _assert_one_line_error(proc, "--block-size 48", "power of two")
    assert list(outs.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "option"), [(["--quant", "int3"], "--quant"), (["--max-context", "8"], "--max-context")]
)
def test_option_rejected_by_the_parser(extra: list[str], option: str, pair_dir: PairDir, tmp_path: Path,
                                       outs: Path) -> None:
    """typer validates these itself and prints its usage box: still a clean, non-zero exit."""
    proc = _run(_args(*pair_dir("e2b-like"), outs / "bundle", *extra), tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert option in proc.stderr
    assert list(outs.iterdir()) == []


def test_out_under_a_file(pair_dir: PairDir, tmp_path: Path, outs: Path) -> None:
    a_file = outs / "a_file"
    a_file.write_text("not a directory")
    proc = _run(_args(*pair_dir("e2b-like"), a_file / "bundle"), tmp_path)
    _assert_one_line_error(proc, str(a_file), "not a directory")
    assert [p.name for p in outs.iterdir()] == ["a_file"] and a_file.read_text() == "not a directory"


def test_out_parent_missing(pair_dir: PairDir, tmp_path: Path, outs: Path) -> None:
    proc = _run(_args(*pair_dir("e2b-like"), outs / "missing" / "bundle"), tmp_path)
    _assert_one_line_error(proc, "does not exist")
    assert list(outs.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_out_parent_not_writable(pair_dir: PairDir, tmp_path: Path, outs: Path) -> None:
    outs.chmod(0o500)
    try:
        proc = _run(_args(*pair_dir("e2b-like"), outs / "bundle"), tmp_path)
    finally:
        outs.chmod(0o700)
    _assert_one_line_error(proc, "cannot write", str(outs))
    assert list(outs.iterdir()) == []


def test_existing_out_is_untouched_without_force(pair_dir: PairDir, tmp_path: Path, outs: Path) -> None:
    out = outs / "bundle"
    out.mkdir()
    (out / "marker").write_text("mine")
    _assert_one_line_error(_run(_args(*pair_dir("e2b-like"), out), tmp_path), str(out), "--force")
    assert [p.name for p in outs.iterdir()] == ["bundle"]
    assert [p.name for p in out.iterdir()] == ["marker"] and (out / "marker").read_text() == "mine"


def test_force_replaces_existing_out(pair_dir: PairDir, tmp_path: Path, outs: Path) -> None:
    out = outs / "bundle"
    out.mkdir()
    (out / "marker").write_text("mine")
    proc = _run(_args(*pair_dir("e2b-like"), out, "--force", "--no-verify"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (out / "marker").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in outs.iterdir()] == ["bundle"]


def test_ctrl_c_mid_export_leaves_nothing(pair_dir: PairDir, tmp_path: Path, outs: Path) -> None:
    out = outs / "bundle"
    proc = _start(_args(*pair_dir("e2b-like"), out), tmp_path)
    _wait_for_partial(proc, out)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 130, stderr  # the shell convention for "ended by SIGINT"
    assert "Traceback" not in stderr
    assert list(outs.iterdir()) == []


def test_killed_export_leaves_only_a_partial_dir_and_a_rerun_works(pair_dir: PairDir, tmp_path: Path,
                                                                  outs: Path) -> None:
    out = outs / "bundle"
    args = _args(*pair_dir("e2b-like"), out)
    proc = _start(args, tmp_path)
    _wait_for_partial(proc, out)
    proc.kill()
    proc.communicate(timeout=TIMEOUT_S)
    # SIGKILL gives the process no chance to clean up. What it leaves is a hidden, uniquely named temp
    # dir, never OUT itself: OUT is only created by the final rename, so a killed run is harmless.
    assert not out.exists()
    stale = _partials(out)
    assert len(stale) == 1 and [p.name for p in outs.iterdir()] == [stale[0].name]

    rerun = _run(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(c["passed"] for c in manifest["parity"]["checks"].values())
    # The rerun published its own temp dir as OUT and removed the killed run's (its process is gone).
    assert _partials(out) == []


@pytest.mark.parametrize("ep", ["qnn", "webgpu", "openvino"])
def test_accelerator_profiles_refuse_a_mixture_of_experts(pair_dir: PairDir, tmp_path: Path, outs: Path,
                                                          ep: str) -> None:
    """The expert dispatch has data-dependent shapes, which a fixed-shape NPU graph cannot hold; onnxruntime's
    WebGPU EP failed on it (a Concat of experts that got no rows), and OpenVINO is untested: cpu only."""
    proc = _run(_args(*pair_dir("moe-like", False), outs / "bundle", "--ep", ep), tmp_path)
    _assert_one_line_error(proc, f"--ep {ep}", "mixture-of-experts", "--ep cpu")
    assert list(outs.iterdir()) == []

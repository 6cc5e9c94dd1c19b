"""An export interrupted in any stage leaves no bundle, and running it again works.

Each signal lands at the start of one stage (load, graphs, write, verify, publish; the start of one is the
end of the one before). SIGINT goes through the CLI's own handler: exit 130, one "interrupted" line, the
temp dir removed. SIGKILL cannot be handled: `edgegen export` runs in subprocesses paused at each stage;
a kill leaves no OUT, only hidden `.OUT.partial-<pid>-*` dirs, which the next export of the same OUT
removes. Only the run signalled in "verify" verifies (the slow stage;
with --no-verify "publish" follows "write"). tests/test_export_errors.py signals a verified export at an
arbitrary moment and checks that a verified rerun passes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgegen.export.bundle import STAGES

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300

# The child: the real CLI, with export_bundle's stage callback wrapped to touch a marker file and sleep.
CHILD = """
import sys, time
from pathlib import Path
import edgegen.export.bundle as bundle

stop, marker = sys.argv.pop(1), Path(sys.argv.pop(1))
real = bundle.export_bundle

def paused(*args, stage, **kwargs):
    def pause(name):
        stage(name)
        if name == stop:
            marker.write_text(name)
            time.sleep(600)
    return real(*args, stage=pause, **kwargs)

bundle.export_bundle = paused
from edgegen.cli import main
sys.argv[0] = "edgegen"
main()
"""


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a non-interactive parent may have left SIGINT ignored


def export_args(pair: tuple[Path, Path], out: Path, verify: bool = False) -> list[str]:
    """Verification (the slowest stage) runs only where the signal lands in or after it."""
    return ["export", "--target", str(pair[0]), "--assistant", str(pair[1]), "--out", str(out), "--max-context", "512",
            *([] if verify else ["--no-verify"])]


def start_paused(stage: str, marker: Path, pair, out: Path) -> subprocess.Popen:
    args = export_args(pair, out, verify=stage == "verify")
    return subprocess.Popen([sys.executable, "-c", CHILD, stage, str(marker), *args], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def wait_for(markers: list[Path], procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not all(m.exists() for m in markers):
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"export ended ({p.returncode}) before its pause: {p.stderr.read()}")
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail("exports never reached their stage")
        time.sleep(0.05)


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def run_in_every_stage(sig: signal.Signals, pair, tmp_path: Path, outs: dict[str, Path]) -> dict[str, tuple]:
    """Start one paused export per stage (in parallel), signal each once paused; (returncode, stderr) per stage."""
    markers = {s: tmp_path / f"at-{s}" for s in STAGES}
    procs = {s: start_paused(s, markers[s], pair, outs[s]) for s in STAGES}
    try:
        wait_for(list(markers.values()), list(procs.values()))
        for p in procs.values():
            p.send_signal(sig)
        return {s: (p.wait(TIMEOUT_S), p.stderr.read()) for s, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("stage", STAGES)
def test_sigint_in_every_stage_leaves_nothing(stage: str, pair_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    """In-process (no second torch import per case): the real `main`, a real SIGINT sent to this process
    at the start of `stage`, the CLI's own handler turning it into an exit 130."""
    import edgegen.export.bundle as bundle
    from edgegen.cli import main

    out = tmp_path / "outs" / "bundle"
    out.parent.mkdir()
    real = bundle.export_bundle

    def paused(*args, stage_cb=None, **kwargs):
        def pause(name):
            kwargs_stage(name)
            if name == stage:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(30)  # the handler raises KeyboardInterrupt here
        kwargs_stage = kwargs.pop("stage")
        return real(*args, stage=pause, **kwargs)

    monkeypatch.setattr(bundle, "export_bundle", paused)
    monkeypatch.setattr(sys, "argv", ["edgegen", *export_args(pair_dir("e2b-like"), out, verify=stage == "verify")])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines() == ["interrupted"], stderr
    assert list(out.parent.iterdir()) == []  # no bundle, no temp dir


def test_sigkill_in_every_stage_leaves_no_bundle_and_a_rerun_works(pair_dir, tmp_path: Path) -> None:
    out = tmp_path / "outs" / "bundle"
    out.parent.mkdir()
    pair = pair_dir("e2b-like")
    results = run_in_every_stage(signal.SIGKILL, pair, tmp_path, {s: out for s in STAGES})
    assert all(code == -signal.SIGKILL for code, _ in results.values())
    assert not out.exists()
    # Every stage after "load" had made its hidden temp dir; nothing else is there.
    left = partials(out)
    assert len(left) == len(STAGES) - 1 and sorted(out.parent.iterdir()) == left

    rerun = subprocess.run([sys.executable, "-m", "edgegen", *export_args(pair, out)], cwd=REPO, capture_output=True,
                           text=True, timeout=TIMEOUT_S, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "manifest.json").is_file()
    assert list(out.parent.iterdir()) == [out]  # the killed runs' temp dirs are gone

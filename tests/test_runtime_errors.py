"""Bad input through the Python API and `edgegen run`: one line saying what is wrong, never a traceback.

API: every case raises EdgegenError with a one-line message. CLI (a real subprocess): non-zero exit,
stderr is exactly one line starting with "error:". Ctrl-C while streaming exits 130 without a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.generate import Generator
from edgegen.runtime.sampling import Sampling

MAX_CONTEXT = 512  # the bundle_dir fixture's default


@pytest.fixture(scope="module")
def bundle(bundle_dir) -> Path:
    return bundle_dir("e2b-like")


@pytest.fixture(scope="module")
def broken(bundle: Path, tmp_path_factory) -> dict[str, Path]:
    """Damaged copies of the session bundle (which must stay intact), and bad prompt files."""
    root = tmp_path_factory.mktemp("broken")

    def copy(name: str) -> Path:
        return Path(shutil.copytree(bundle, root / name))

    out = {"missing": root / "does-not-exist"}
    out["file"] = root / "a-file"
    out["file"].write_text("not a bundle")
    out["no-manifest"] = copy("no-manifest")
    (out["no-manifest"] / "manifest.json").unlink()
    out["bad-json"] = copy("bad-json")
    (out["bad-json"] / "manifest.json").write_text('{"schema_version": 1, "model": ')
    out["schema"] = copy("schema")
    manifest = json.loads((bundle / "manifest.json").read_text())
    (out["schema"] / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 999}))
    out["truncated-onnx"] = copy("truncated-onnx")
    onnx_file = out["truncated-onnx"] / "target.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    out["missing-onnx"] = copy("missing-onnx")
    (out["missing-onnx"] / "target.onnx").unlink()
    for name, file in (("truncated-weights", "target.weights"), ("truncated-ple", "ple.npy")):
        out[name] = copy(name)
        with (out[name] / file).open("r+b") as fh:
            fh.truncate((out[name] / file).stat().st_size // 2)
    # Prompt files.
    out["long-prompt"] = root / "long.txt"
    out["long-prompt"].write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    out["latin1-prompt"] = root / "latin1.txt"
    out["latin1-prompt"].write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e \xff\xfe".encode("latin-1"))
    return out


def assert_one_line(err: EdgegenError) -> None:
    msg = str(err)
    assert msg.strip() and "\n" not in msg and "Traceback" not in msg


# -- Python API ----------------------------------------------------------------------------------------

EXPECTED_WORDS = {"missing": "does not exist", "file": "not a directory", "no-manifest": "manifest.json",
                  "bad-json": "not valid JSON", "schema": "schema version", "truncated-onnx": "target.onnx",
                  "missing-onnx": "missing", "truncated-weights": "target.weights", "truncated-ple": "ple.npy"}
BAD_BUNDLES = list(EXPECTED_WORDS)


@pytest.mark.parametrize("case", BAD_BUNDLES)
def test_api_bad_bundle(broken, case: str) -> None:
    with pytest.raises(EdgegenError) as err:
        Generator(broken[case])
    assert_one_line(err.value)
    assert EXPECTED_WORDS[case] in str(err.value)


@pytest.fixture(scope="module")
def gen(bundle: Path) -> Generator:
    return Generator(bundle)


@pytest.mark.parametrize(("prompt", "kwargs", "words"), [
    ([], {}, "empty"),
    ("", {}, "empty"),
    ([7] * MAX_CONTEXT, {}, str(MAX_CONTEXT)),
    ([7] * (MAX_CONTEXT + 100), {}, str(MAX_CONTEXT)),
    ([7, 100_000], {}, "token ids"),
    ([7, -1], {}, "token ids"),
    ([7, 8], {"max_new_tokens": 0}, "max new tokens"),
    ([7, 8], {"draft_tokens": -1}, "draft tokens"),
], ids=["empty-ids", "empty-text", "prompt-fills-context", "prompt-over-context", "id-over-vocab",
        "negative-id", "zero-budget", "negative-drafts"])
def test_api_bad_generation_input(gen: Generator, prompt, kwargs, words: str) -> None:
    gen.reset()
    with pytest.raises(EdgegenError) as err:
        gen.generate(prompt, **kwargs)
    assert_one_line(err.value)
    assert words in str(err.value)
    assert gen.generate([7, 8], max_new_tokens=2).token_ids  # the generator is still usable


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -3}])
def test_api_bad_sampling(kwargs) -> None:
    with pytest.raises(EdgegenError) as err:
        Sampling(**kwargs)
    assert_one_line(err.value)


# -- CLI -----------------------------------------------------------------------------------------------


def edgegen(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgegen", "run", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


CLI_CASES: dict[str, Callable[[dict, Path], list[str]]] = {
    "missing-bundle": lambda b, ok: [str(b["missing"]), "-p", "hi"],
    "file-not-dir": lambda b, ok: [str(b["file"]), "-p", "hi"],
    "no-manifest": lambda b, ok: [str(b["no-manifest"]), "-p", "hi"],
    "manifest-not-json": lambda b, ok: [str(b["bad-json"]), "-p", "hi"],
    "schema-version": lambda b, ok: [str(b["schema"]), "-p", "hi"],
    "truncated-onnx": lambda b, ok: [str(b["truncated-onnx"]), "-p", "hi"],
    "missing-onnx": lambda b, ok: [str(b["missing-onnx"]), "-p", "hi"],
    "truncated-weights": lambda b, ok: [str(b["truncated-weights"]), "-p", "hi"],
    "truncated-ple": lambda b, ok: [str(b["truncated-ple"]), "-p", "hi"],
    "empty-prompt": lambda b, ok: [str(ok), "-p", ""],
    "blank-prompt": lambda b, ok: [str(ok), "-p", "  \n "],
    "prompt-over-context": lambda b, ok: [str(ok), "-f", str(b["long-prompt"])],
    "temperature": lambda b, ok: [str(ok), "-p", "hi", "--temperature", "-1"],
    "top-p-zero": lambda b, ok: [str(ok), "-p", "hi", "--top-p", "0"],
    "top-p-over-one": lambda b, ok: [str(ok), "-p", "hi", "--top-p", "1.5"],
    "top-k-negative": lambda b, ok: [str(ok), "-p", "hi", "--top-k", "-3"],
    "non-utf8-file": lambda b, ok: [str(ok), "-f", str(b["latin1-prompt"])],
    "missing-prompt-file": lambda b, ok: [str(ok), "-f", str(b["missing"])],
    "prompt-and-chat": lambda b, ok: [str(ok), "-p", "hi", "--chat"],
    "no-prompt": lambda b, ok: [str(ok)],
    "negative-draft-tokens": lambda b, ok: [str(ok), "-p", "hi", "-k", "-2"],
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_error_line(broken, bundle: Path, case: str) -> None:
    proc = edgegen(*CLI_CASES[case](broken, bundle))
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


def test_cli_long_prompt_really_is_over_the_context(bundle: Path, broken) -> None:
    """The over-context case fails for its length, not for something else."""
    from edgegen.runtime.manifest import load_manifest
    from edgegen.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(bundle, load_manifest(bundle).tokenizer)
    assert len(tok.encode(broken["long-prompt"].read_text(encoding="utf-8"))) > MAX_CONTEXT
    proc = edgegen(str(bundle), "-f", str(broken["long-prompt"]))
    assert str(MAX_CONTEXT) in proc.stderr


def test_cli_good_run_still_works(bundle: Path) -> None:
    """The same command line with good input succeeds (so the failures above are about the input)."""
    proc = edgegen(str(bundle), "-p", "hi", "-n", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) >= 1


def test_ctrl_c_while_streaming_exits_130(bundle: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Chat mode with stdin left open: the process is either streaming a reply or waiting for the next
    # line when the signal lands, never finished (a plain prompt can end before SIGINT on a fast machine).
    proc = subprocess.Popen([sys.executable, "-m", "edgegen", "run", str(bundle), "--chat", "-n", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        first = proc.stdout.read(1)  # streaming has started
        assert first, proc.stderr.read().decode()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err

"""The bad-input matrix: what a user or a file can get wrong, for `run`, `bench`, `export`, `distill` and the
Python API, in one place.

Every row promises the same: the API raises EdgegenError with a one-line message; the CLI (a real
subprocess) exits non-zero with exactly one stderr line starting with "error:", no traceback, and nothing
left where the command would write (export/distill --out, bench --plot). Count: API_BUNDLES,
API_GENERATION, API_OPTIONS and CLI_CASES below (pytest -q tests/test_bad_input.py --collect-only lists
them). Deeper cases of the same promise live next to the code they exercise: tests/test_export_errors.py
(bad models, mismatched pairs, OUT problems, interrupts), tests/test_integrity.py (paths escaping the
bundle, damaged files), tests/test_numerics.py (NaN/inf), tests/test_fuzz.py (random options and manifests).
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

from edgegen.export.bundle import export_bundle
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.generate import Generator
from edgegen.runtime.integrity import sha256_file
from edgegen.runtime.model import Bundle
from edgegen.runtime.sampling import Sampling

REPO = Path(__file__).resolve().parent.parent

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
    # Bundles that look intact but are not: a flipped byte, a path out of the bundle, a broken chat template.
    out["bit-flip"] = copy("bit-flip")
    with (out["bit-flip"] / "shared.weights").open("r+b") as fh:
        fh.seek(5000)
        fh.write(b"\x7f")
    out["escape"] = copy("escape")
    _edit(out["escape"], lambda raw: raw["graphs"]["target"].update(file="../target.onnx"))
    out["bad-template"] = copy("bad-template")
    (out["bad-template"] / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content | nosuch }}")
    _edit(out["bad-template"], lambda raw: raw["files"].update({"chat_template.jinja": _listing(
        out["bad-template"] / "chat_template.jinja")}))
    # Prompt files.
    out["long-prompt"] = root / "long.txt"
    out["long-prompt"].write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    out["latin1-prompt"] = root / "latin1.txt"
    out["latin1-prompt"].write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e \xff\xfe".encode("latin-1"))
    # Not a model: a directory with a config of another architecture.
    out["llama"] = root / "llama"
    out["llama"].mkdir()
    (out["llama"] / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    # Where a failed command must not leave anything (export/distill --out, bench --plot).
    out["out"] = root / "outs" / "result"
    out["out"].parent.mkdir()
    return out


def _edit(bundle: Path, change) -> None:
    raw = json.loads((bundle / "manifest.json").read_text())
    change(raw)
    (bundle / "manifest.json").write_text(json.dumps(raw))


def _listing(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def assert_one_line(err: EdgegenError) -> None:
    msg = str(err)
    assert msg.strip() and "\n" not in msg and "Traceback" not in msg


# -- Python API ----------------------------------------------------------------------------------------

EXPECTED_WORDS = {"missing": "does not exist", "file": "not a directory", "no-manifest": "manifest.json",
                  "bad-json": "not valid JSON", "schema": "schema version", "truncated-onnx": "target.onnx",
                  "missing-onnx": "missing", "truncated-weights": "target.weights", "truncated-ple": "ple.npy",
                  "bit-flip": "shared.weights", "escape": "outside the bundle"}
API_BUNDLES = list(EXPECTED_WORDS)


@pytest.mark.parametrize("case", API_BUNDLES)
def test_api_bad_bundle(broken, case: str) -> None:
    with pytest.raises(EdgegenError) as err:
        Generator(broken[case])
    assert_one_line(err.value)
    assert EXPECTED_WORDS[case] in str(err.value)


@pytest.fixture(scope="module")
def gen(bundle: Path) -> Generator:
    return Generator(bundle)


API_GENERATION = [
    ([], {}, "empty"),
    ("", {}, "empty"),
    ([7] * MAX_CONTEXT, {}, str(MAX_CONTEXT)),
    ([7] * (MAX_CONTEXT + 100), {}, str(MAX_CONTEXT)),
    ([7, 100_000], {}, "token ids"),
    ([7, -1], {}, "token ids"),
    ([7, 8], {"max_new_tokens": 0}, "max new tokens"),
    ([7, 8], {"draft_tokens": -1}, "draft tokens"),
    ([7, 8], {"draft_tokens": "many"}, "draft tokens"),
    ("caf\udce9", {}, "UTF-8"),
]


@pytest.mark.parametrize(("prompt", "kwargs", "words"), API_GENERATION,
                         ids=["empty-ids", "empty-text", "prompt-fills-context", "prompt-over-context", "id-over-vocab",
                              "negative-id", "zero-budget", "negative-drafts", "drafts-not-a-number", "not-utf8-text"])
def test_api_bad_generation_input(gen: Generator, prompt, kwargs, words: str) -> None:
    gen.reset()
    with pytest.raises(EdgegenError) as err:
        gen.generate(prompt, **kwargs)
    assert_one_line(err.value)
    assert words in str(err.value)
    assert gen.generate([7, 8], max_new_tokens=2).token_ids  # the generator is still usable


def test_api_broken_chat_template(broken) -> None:
    with pytest.raises(EdgegenError) as err:
        list(Generator(broken["bad-template"]).chat("hello"))
    assert_one_line(err.value)
    assert "chat template" in str(err.value)


API_OPTIONS = [
    lambda b: Sampling(temperature=-1.0),
    lambda b: Sampling(temperature=float("nan")),
    lambda b: Sampling(temperature="hot"),
    lambda b: Sampling(top_p=0.0),
    lambda b: Sampling(top_p=1.5),
    lambda b: Sampling(top_k=-3),
    lambda b: Sampling(top_k=1.5),
    lambda b: Sampling(seed=-1),
    lambda b: Bundle(b, hashes="sometimes"),
    lambda b: export_bundle(str(b.parent / "no-such-model"), str(b), b.parent / "never-written"),
]


@pytest.mark.parametrize("make", API_OPTIONS, ids=["temperature-negative", "temperature-nan", "temperature-str",
                                                   "top-p-zero", "top-p-over-one", "top-k-negative", "top-k-float",
                                                   "seed-negative", "hash-mode", "export-missing-target"])
def test_api_bad_option(make, bundle: Path) -> None:
    with pytest.raises(EdgegenError) as err:
        make(bundle)
    assert_one_line(err.value)
    assert not (bundle.parent / "never-written").exists()


# -- CLI -----------------------------------------------------------------------------------------------


def edgegen(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m edgegen ARGS` from the repository root (so it runs this checkout's code); stdin holds one
    chat line and ends."""
    return subprocess.run([sys.executable, "-m", "edgegen", *args], capture_output=True, timeout=timeout,
                          input=b"hello\n", cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})


# Each row: the arguments after `edgegen`, given the broken inputs `b` and the good bundle `ok`.
CLI_CASES: dict[str, Callable[[dict, Path], list[str]]] = {
    # run
    "run: missing bundle": lambda b, ok: ["run", str(b["missing"]), "-p", "hi"],
    "run: file, not a bundle dir": lambda b, ok: ["run", str(b["file"]), "-p", "hi"],
    "run: no manifest": lambda b, ok: ["run", str(b["no-manifest"]), "-p", "hi"],
    "run: manifest not JSON": lambda b, ok: ["run", str(b["bad-json"]), "-p", "hi"],
    "run: schema version 999": lambda b, ok: ["run", str(b["schema"]), "-p", "hi"],
    "run: truncated onnx": lambda b, ok: ["run", str(b["truncated-onnx"]), "-p", "hi"],
    "run: missing onnx": lambda b, ok: ["run", str(b["missing-onnx"]), "-p", "hi"],
    "run: truncated weights": lambda b, ok: ["run", str(b["truncated-weights"]), "-p", "hi"],
    "run: truncated PLE table": lambda b, ok: ["run", str(b["truncated-ple"]), "-p", "hi"],
    "run: one flipped byte": lambda b, ok: ["run", str(b["bit-flip"]), "-p", "hi"],
    "run: graph path escapes the bundle": lambda b, ok: ["run", str(b["escape"]), "-p", "hi"],
    "run: broken chat template": lambda b, ok: ["run", str(b["bad-template"]), "--chat"],
    "run: empty prompt": lambda b, ok: ["run", str(ok), "-p", ""],
    "run: blank prompt": lambda b, ok: ["run", str(ok), "-p", "  \n "],
    "run: prompt over the context": lambda b, ok: ["run", str(ok), "-f", str(b["long-prompt"])],
    "run: non-UTF-8 prompt file": lambda b, ok: ["run", str(ok), "-f", str(b["latin1-prompt"])],
    "run: non-UTF-8 prompt argument": lambda b, ok: ["run", str(ok), "-p", os.fsdecode(b"caf\xe9")],
    "run: missing prompt file": lambda b, ok: ["run", str(ok), "-f", str(b["missing"])],
    "run: prompt and chat": lambda b, ok: ["run", str(ok), "-p", "hi", "--chat"],
    "run: no prompt": lambda b, ok: ["run", str(ok)],
    "run: temperature -1": lambda b, ok: ["run", str(ok), "-p", "hi", "--temperature", "-1"],
    "run: top-p 0": lambda b, ok: ["run", str(ok), "-p", "hi", "--top-p", "0"],
    "run: top-p 1.5": lambda b, ok: ["run", str(ok), "-p", "hi", "--top-p", "1.5"],
    "run: top-k -3": lambda b, ok: ["run", str(ok), "-p", "hi", "--top-k", "-3"],
    "run: seed -1": lambda b, ok: ["run", str(ok), "-p", "hi", "--temperature", "1", "--seed", "-1"],
    "run: draft tokens -2": lambda b, ok: ["run", str(ok), "-p", "hi", "--draft-tokens", "-2"],
    "run: max new tokens 0": lambda b, ok: ["run", str(ok), "-p", "hi", "-n", "0"],
    "run: threads 0": lambda b, ok: ["run", str(ok), "-p", "hi", "--threads", "0"],
    # bench
    "bench: missing bundle": lambda b, ok: ["bench", str(b["missing"]), "-n", "2"],
    "bench: damaged bundle": lambda b, ok: ["bench", str(b["bit-flip"]), "-n", "2"],
    "bench: max new tokens 1": lambda b, ok: ["bench", str(ok), "-n", "1"],
    "bench: draft tokens 'abc'": lambda b, ok: ["bench", str(ok), "-n", "2", "--draft-tokens", "abc"],
    "bench: repeats 0": lambda b, ok: ["bench", str(ok), "-n", "2", "--repeats", "0"],
    "bench: plot into a missing dir": lambda b, ok: ["bench", str(ok), "-n", "2", "--plot", str(b["out"] / "x.png")],
    "bench: plot onto a directory": lambda b, ok: ["bench", str(ok), "-n", "2", "--plot", str(b["out"].parent)],
    # export (more in test_export_errors.py: bad models, mismatched pairs, OUT problems)
    "export: quant int3": lambda b, ok: ["export", "--target", "t", "--assistant", "a", "--out", str(b["out"]),
                                         "--quant", "int3"],
    "export: assistant quant int3": lambda b, ok: ["export", "--target", "t", "--assistant", "a", "--out",
                                                   str(b["out"]), "--assistant-quant", "int3"],
    "export: block size 512": lambda b, ok: ["export", "--target", "t", "--assistant", "a", "--out", str(b["out"]),
                                             "--block-size", "512"],
    "export: max context 8": lambda b, ok: ["export", "--target", "t", "--assistant", "a", "--out", str(b["out"]),
                                            "--max-context", "8"],
    "export: a bundle as the target": lambda b, ok: ["export", "--target", str(ok), "--assistant", str(ok),
                                                     "--out", str(b["out"])],
    # distill
    "distill: missing target": lambda b, ok: ["distill", "--target", str(b["missing"]), "--out", str(b["out"])],
    "distill: not a Gemma 4 target": lambda b, ok: ["distill", "--target", str(b["llama"]), "--out", str(b["out"])],
    "distill: missing data": lambda b, ok: ["distill", "--target", str(REPO / "models/demo/target"), "--out",
                                            str(b["out"]), "--data", str(b["missing"])],
    "distill: steps 0": lambda b, ok: ["distill", "--target", "t", "--out", str(b["out"]), "--steps", "0"],
    "distill: learning rate -1": lambda b, ok: ["distill", "--target", "t", "--out", str(b["out"]), "--lr", "-1"],
    "distill: draft tokens 99": lambda b, ok: ["distill", "--target", "t", "--out", str(b["out"]),
                                               "--draft-tokens", "99"],
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_error_line(broken, bundle: Path, case: str) -> None:
    proc = edgegen(*CLI_CASES[case](broken, bundle))
    stderr = proc.stderr.decode("utf-8", "replace")
    lines = stderr.splitlines()
    assert proc.returncode != 0, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "internal error" not in lines[0]  # the last-resort branch of cli.main is for bugs only
    assert not broken["out"].exists() and list(broken["out"].parent.iterdir()) == []  # nothing half-written


def test_cli_long_prompt_really_is_over_the_context(bundle: Path, broken) -> None:
    """The over-context case fails for its length, not for something else."""
    from edgegen.runtime.manifest import load_manifest
    from edgegen.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(bundle, load_manifest(bundle).tokenizer)
    assert len(tok.encode(broken["long-prompt"].read_text(encoding="utf-8"))) > MAX_CONTEXT
    proc = edgegen("run", str(bundle), "-f", str(broken["long-prompt"]))
    assert str(MAX_CONTEXT).encode() in proc.stderr


def test_cli_good_run_still_works(bundle: Path) -> None:
    """The same command line with good input succeeds (so the failures above are about the input)."""
    proc = edgegen("run", str(bundle), "-p", "hi", "-n", "3", "--json")
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

"""Fuzzing (hypothesis): random CLI options and random manifest damage never let a traceback escape.

CLI: `edgegen.cli.main` runs in-process (a subprocess per example would be 20x slower) with random values
for every option of `run` and `bench`, and random option values for `export` and `distill` aimed at a
missing model (so each example ends after option handling). Allowed outcomes: exit 0, or a non-zero exit
with one `error:` line on stderr that is not the "internal error" fallback.

Manifests: one to three random edits of a good manifest (a value replaced by a random JSON value, or a
key deleted), then `Generator(bundle)` and three generated tokens. Allowed outcomes: it works, or one
EdgegenError line. The weight files stay intact, so every failure is about the manifest.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgegen.cli import main
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.generate import Generator
from edgegen.runtime.manifest import MANIFEST

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bundle(bundle_dir, tmp_path_factory) -> Path:
    """A private copy whose manifest the manifest fuzzer rewrites; the CLI fuzzer only reads it."""
    return Path(shutil.copytree(bundle_dir("e2b-like"), tmp_path_factory.mktemp("fuzz") / "bundle"))


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("EDGEGEN_CACHE", str(tmp_path_factory.getbasetemp() / "fuzz-cache"))


# -- CLI ----------------------------------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12)
weird_text = st.one_of(text, st.sampled_from(["", " ", "\ufffd", "caf\udce9", "<eos>", "\n\n", "../x", "-1"]))
numbers = st.one_of(st.integers(-5, 40).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.sampled_from(["", "abc", "1e309", "-0", "0x10", "1_000"]))


def option(name: str, values: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(st.just(name), values).map(list)


RUN_OPTIONS = [option("-n", st.integers(-3, 24).map(str) | numbers), option("--temperature", numbers),
               option("--temp", numbers), option("-t", st.sampled_from(["1", "0", "x"])),
               option("--top-k", numbers), option("--top-p", numbers), option("--seed", numbers),
               option("--draft-tokens", st.sampled_from(["auto", "0", "1", "4", "-1", "x", "99", ""])),
               option("--stop", weird_text), option("--threads", st.sampled_from(["1", "2", "0", "-1", "x"])),
               st.just(["--json"]), st.just(["--no-assistant"]), st.just(["--stats"]), st.just(["--chat"]),
               option("-p", weird_text), option("--bogus", text)]
BENCH_OPTIONS = [option("-n", st.sampled_from(["2", "3", "1", "0", "x"])),
                 option("--draft-tokens", st.sampled_from(["auto", "2", "x"])),
                 option("--repeats", st.sampled_from(["1", "0", "-2", "x"])),
                 option("--threads", st.sampled_from(["1", "0"])), option("-t", st.sampled_from(["1", "-1"])),
                 option("--ep", st.sampled_from(["cpu", "nope", "", "cpu,", "cpu,nope"])), st.just(["--json"])]
EXPORT_OPTIONS = [option("--quant", st.sampled_from(["fp32", "int8", "int4", "int3", ""])),
                  option("--assistant-quant", st.sampled_from(["int8", "fp16", ""])), option("--block-size", numbers),
                  option("--max-context", numbers), st.just(["--no-verify"]), st.just(["--force"])]
DISTILL_OPTIONS = [option("--steps", numbers), option("--draft-tokens", numbers), option("--seq-len", numbers),
                   option("--batch-size", numbers), option("--lr", numbers), option("--hidden-size", numbers),
                   option("--layers", numbers), option("--centroids", numbers), option("--data", weird_text),
                   st.just(["--bf16"]), st.just(["--no-resume"])]


def command(fixed: list[str], options: list[st.SearchStrategy]) -> st.SearchStrategy:
    return st.lists(st.one_of(options), max_size=5).map(lambda opts: fixed + [a for o in opts for a in o])


def run_main(argv: list[str], stdin: str = "hello\n") -> tuple[int, str]:
    """`edgegen ARGV` in-process; (exit code, stderr). Anything but SystemExit escaping fails the test."""
    err = io.StringIO()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    old = sys.argv, sys.stdin
    sys.argv, sys.stdin = ["edgegen", *argv], io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv, sys.stdin = old
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return code, err.getvalue()


def assert_clean(code: int, stderr: str) -> None:
    assert "Traceback" not in stderr
    if code != 0:
        lines = stderr.strip().splitlines()
        assert lines and lines[-1].startswith("error:") and len(lines) == 1, stderr
        assert "internal error" not in stderr, stderr


@FUZZ
@given(data=st.data())
def test_cli_run_and_bench_options(bundle: Path, data) -> None:
    which = data.draw(st.sampled_from(["run", "bench"]))
    if which == "run":
        argv = data.draw(command(["run", str(bundle)], RUN_OPTIONS))
        if not any(a in argv for a in ("-p", "--chat")):
            argv += ["-p", "def f("]
        argv += ["-n", "8"] if "-n" not in argv else []
    else:
        argv = data.draw(command(["bench", str(bundle), "-n", "2"], BENCH_OPTIONS))
    assert_clean(*run_main(argv))


@FUZZ
@given(data=st.data())
def test_cli_export_and_distill_options(tmp_path_factory, data) -> None:
    missing = str(tmp_path_factory.getbasetemp() / "no-such-model")
    out = tmp_path_factory.getbasetemp() / "fuzz-out" / "result"
    out.parent.mkdir(exist_ok=True)
    if data.draw(st.booleans()):
        argv = data.draw(command(["export", "--target", missing, "--assistant", missing, "--out", str(out)],
                                 EXPORT_OPTIONS))
    else:
        argv = data.draw(command(["distill", "--target", missing, "--out", str(out)], DISTILL_OPTIONS))
    code, stderr = run_main(argv)
    assert code != 0  # the model does not exist: every run must stop
    assert_clean(code, stderr)
    assert not out.exists()


# -- manifests ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=False),
              st.sampled_from([0, -1, 1, 2**31, "", "../target.onnx", "/etc/passwd", "target.onnx", "past_key.0",
                               "float32", "sliding_attention", "0" * 64])),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def paths(value, prefix=()) -> list[tuple]:
    """Every place in a JSON tree: dict keys and list indexes, outermost first."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out.extend(paths(child, (*prefix, key)))
    return out


@pytest.fixture(scope="module")
def good_manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


@FUZZ
@given(data=st.data())
def test_manifest_damage_is_an_edgegen_error_or_works(bundle: Path, good_manifest: dict, data) -> None:
    raw = copy.deepcopy(good_manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        places = paths(raw)
        if not places:
            break
        where = data.draw(st.sampled_from(places))
        parent = raw
        for key in where[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = data.draw(json_values)
    (bundle / MANIFEST).write_text(json.dumps(raw))
    try:
        gen = Generator(bundle)
        gen.generate([1, 2, 3], max_new_tokens=3, draft_tokens=data.draw(st.sampled_from([0, 2, 4, "auto"])))
    except EdgegenError as exc:
        assert str(exc) and "\n" not in str(exc)
    finally:
        (bundle / MANIFEST).write_text(json.dumps(good_manifest))

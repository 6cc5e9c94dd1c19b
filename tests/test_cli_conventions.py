"""What users see of the CLI and the Python API: help texts with every default, option names, the demo
bundle as the default of `run` and `bench`, `edgegen.load`, and the README's Python example run as written.

Options are read from the typer/click command objects, so a new option is checked without editing this file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
import typer

import edgegen
from edgegen.cli import app

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("run", "export", "bench", "distill")


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory) -> dict[str, str]:
    """Environment whose EDGEGEN_CACHE holds the demo bundle (exported here once, as on a first `edgegen run`)."""
    from edgegen.demo import demo_bundle

    cache = tmp_path_factory.mktemp("demo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEGEN_CACHE", str(cache))
        demo_bundle()
    return {**os.environ, "EDGEGEN_CACHE": str(cache)}


def edgegen_cli(*args: str, env: dict[str, str] | None = None, columns: int | None = None
                ) -> subprocess.CompletedProcess:
    env = dict(env or os.environ)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "edgegen", *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env=env)


def command(name: str):
    return typer.main.get_command(app).commands[name]


def help_entries(text: str) -> dict[str, tuple[str, str]]:
    """{each option name: (the names-and-placeholder head of its entry, the whole entry, whitespace
    collapsed)}, from click's help layout: an entry starts at two spaces of indent with its head, then two
    spaces or a new line, then the help text; wrapped lines are indented further."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            entries.append([line.strip().split("  ")[0], line.strip()])
        elif line.startswith("   ") and entries:
            entries[-1][1] += " " + line.strip()
        else:
            entries.append(["", ""])  # a section heading or blank line ends the entry
    out = {}
    for head, entry in entries:
        for name in re.findall(r"(?:^|, )(--?[\w-]+)", head):
            out[name] = (head, " ".join(entry.split()))
    return out


def shown_default(value) -> str | None:
    """What `[default: ...]` must say for this default, or None when nothing is to be shown: no value
    (None, an empty list) or an off flag."""
    if value is None or value == [] or value is False:
        return None
    return str(value.value if isinstance(value, Enum) else value)


@pytest.mark.parametrize("columns", [80, 200])
@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_option_with_help_and_default(name: str, columns: int) -> None:
    proc = edgegen_cli(name, "--help", columns=columns)
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout
    entries = help_entries(proc.stdout)
    options = [p for p in command(name).params if p.param_type_name == "option" and not p.hidden]
    assert len(options) >= 7
    for p in options:
        assert p.opts[0] in entries, f"{name} --help lists no {p.opts[0]}:\n{proc.stdout}"
        head, entry = entries[p.opts[0]]
        assert p.help, f"{name} {p.opts[0]} has no help text"
        assert " ".join(p.help.split()[:3]) in entry, entry
        default = shown_default(p.default)
        if default is not None:
            assert f"[default: {default}" in entry, entry
        if p.is_flag:  # a flag takes no value: its head is only its names
            assert re.fullmatch(r"--?[\w-]+(, --?[\w-]+)*", head), entry
        else:
            assert re.search(r" <[^>]+>$", head), entry  # a value placeholder
    if any(p.param_type_name == "argument" and not p.required for p in command(name).params):
        assert "[default: the bundled demo pair]" in " ".join(proc.stdout.split()), proc.stdout


def test_help_text_explains_none_defaults() -> None:
    """Options whose default is "not given" say what that means, where it means something."""
    for name, option in (("run", "--threads"), ("run", "--seed"), ("bench", "--threads"), ("bench", "--plot"),
                         ("export", "--assistant-quant"), ("export", "--soc-model"), ("distill", "--data"),
                         ("distill", "--init")):
        head, entry = help_entries(edgegen_cli(name, "--help", columns=200).stdout)[option]
        assert "[default: " in entry, entry


def test_option_names_parse_as_documented() -> None:
    run = command("run").make_context("run", ["-t", "3", "--temp", "0.5", "-p", "x"]).params
    assert (run["threads"], run["temperature"]) == (3, 0.5)
    assert command("run").make_context("run", ["--temperature", "0.25", "-p", "x"]).params["temperature"] == 0.25
    bench = command("bench").make_context("bench", ["-t", "2", "--draft-tokens", "3"]).params
    assert (bench["threads"], bench["draft_tokens"], bench["bundle"], bench["no_spin"]) == (2, "3", None, False)
    assert command("run").make_context("run", ["--no-spin", "-p", "x"]).params["no_spin"] is True


@pytest.mark.parametrize("argv", [["run", "-p", "hi", "-k", "4"], ["bench", "-k", "4"]])
def test_short_k_is_gone(argv: list[str], demo_env) -> None:
    proc = edgegen_cli(*argv, env=demo_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: No such option: -k (see --help)"]


def test_temp_and_t_run_the_same_as_the_long_names(demo_env) -> None:
    """Seeded sampling is reproducible, so the short spellings must give the long spellings' tokens."""
    common = ["run", "-p", "def parse_args(", "-n", "12", "--seed", "3", "--json"]
    short = edgegen_cli(*common, "--temp", "0.8", "-t", "1", env=demo_env)
    long = edgegen_cli(*common, "--temperature", "0.8", "--threads", "1", env=demo_env)
    assert short.returncode == 0 and long.returncode == 0, short.stderr + long.stderr
    ids = json.loads(short.stdout)["token_ids"]
    assert ids == json.loads(long.stdout)["token_ids"] and 1 <= len(ids) <= 12
    greedy = edgegen_cli(*common, "--temp", "0", "-t", "1", env=demo_env)
    assert greedy.returncode == 0, greedy.stderr


@pytest.mark.parametrize("ep, bad", [("nope", "'nope'"), ("cpu,gpu", "'gpu'"), ("cpu,", "empty")])
def test_bench_unknown_ep_is_one_line(ep: str, bad: str, demo_env) -> None:
    proc = edgegen_cli("bench", "--ep", ep, env=demo_env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and bad in lines[0]
    assert "cpu, qnn, webgpu, openvino, auto" in lines[0]


def test_bench_json_without_a_bundle_uses_the_demo(demo_env) -> None:
    proc = edgegen_cli("bench", "--json", "--max-new-tokens", "4", "--repeats", "1", "-t", "2", "--no-spin",
                       env=demo_env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["spin"] is False
    assert Path(result["bundle"]).parent == Path(demo_env["EDGEGEN_CACHE"])
    assert Path(result["bundle"]).name.startswith("demo-")
    assert set(result["modes"]) == {"plain", "speculative"}
    for mode in result["modes"].values():
        assert mode["tokens"] > 0 and mode["tokens_per_second"] > 0
    assert result["peak_rss_mb"] > 10  # onnxruntime and numpy alone are more than that


def test_run_stats_explain_the_drafting_decision(demo_env) -> None:
    """The README's first command without --draft-tokens: `auto` decides, and the stats say what and why."""
    proc = edgegen_cli("run", "--prompt", "def read_config(path):", "--stats", "-n", "48", env=demo_env)
    assert proc.returncode == 0, proc.stderr
    stats = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert "tokens/target call" in stats[-2]
    decision = re.fullmatch(r"\[auto (turned drafting off|drafts \d+ per round): a \d+-draft round costs [\d.]+ ms "
                            r"drafting \+ [\d.]+ ms verify for [\d.]+ expected tokens \([\d.]+ ms/token\), a plain "
                            r"step [\d.]+ ms/token.*\]", stats[-1])
    assert decision, stats[-1]
    fixed = edgegen_cli("run", "--prompt", "def read_config(path):", "--stats", "-n", "16", "--draft-tokens", "4",
                        env=demo_env)
    assert fixed.returncode == 0 and "[fixed 4 drafts per round]" in fixed.stderr.splitlines(), fixed.stderr


# -- no POSIX-only code without a fallback ------------------------------------------------------------------


def test_os_facts_on_this_machine(tmp_path: Path) -> None:
    from edgegen.runtime import osinfo

    assert osinfo.peak_rss_mb() > 10  # onnxruntime and numpy alone are more than that
    assert osinfo.physical_memory() > 2**30
    f = tmp_path / "f"
    f.write_bytes(b"x")
    assert osinfo.change_time_ns(f, f.stat()) == f.stat().st_ctime_ns


def test_os_facts_degrade_to_none_where_the_os_call_is_missing(monkeypatch, tmp_path: Path) -> None:
    """The Windows branch run here finds no Win32 API: every fact is None, nothing raises. Where `resource`
    is missing on POSIX, peak RSS is None too."""
    from edgegen.runtime import osinfo

    f = tmp_path / "f"
    f.write_bytes(b"x")
    monkeypatch.setattr(osinfo, "WINDOWS", True)
    if sys.platform != "win32":
        assert osinfo.peak_rss_mb() is None and osinfo.physical_memory() is None
        assert osinfo.change_time_ns(f, f.stat()) is None
        assert osinfo.process_alive(os.getpid())  # unknown counts as alive: nothing of it is removed
    monkeypatch.setattr(osinfo, "WINDOWS", False)
    monkeypatch.setitem(sys.modules, "resource", None)  # import resource -> ImportError
    assert osinfo.peak_rss_mb() is None


def test_prefetch_rows_of_a_mapped_table(monkeypatch, tmp_path: Path) -> None:
    """Read-ahead requests for rows of a mapped .npy table: rows of an odd width straddle pages and the header
    shifts them off page boundaries, the first and last rows and a repeated one are asked for; nothing raises
    and the rows read are the table's. Without madvise (Windows) it does nothing."""
    import mmap

    import numpy as np

    from edgegen.runtime import osinfo

    table = np.arange(3001 * 37, dtype=np.int64).reshape(3001, 37)
    np.save(tmp_path / "t.npy", table)
    rows = osinfo.map_npy(tmp_path / "t.npy")
    assert isinstance(rows.base, mmap.mmap)  # the advised path, not the fallback
    ids = np.array([0, 3000, 1234, 1234, 7])
    osinfo.prefetch_rows(rows, ids)
    assert np.array_equal(rows[ids], table[ids])
    monkeypatch.delattr(mmap, "MADV_WILLNEED", raising=False)
    osinfo.prefetch_rows(rows, ids)
    osinfo.prefetch_rows(table, ids)  # not a mapped table: nothing to advise
    assert np.array_equal(rows[ids], table[ids])


def test_process_alive_on_this_os() -> None:
    from edgegen.runtime import osinfo

    assert osinfo.process_alive(os.getpid())
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not osinfo.process_alive(int(child.stdout))  # exited and reaped


def test_integrity_without_a_change_time_hashes_every_load(monkeypatch, tmp_path: Path, bundle_dir) -> None:
    """Without a trustworthy change time (st_ctime on Windows is the creation time), no file is
    remembered as verified: every load hashes, and a damaged file is still caught."""
    from edgegen.runtime import integrity, osinfo
    from edgegen.runtime.manifest import load_manifest

    bundle = bundle_dir("e2b-like")
    m = load_manifest(bundle)
    monkeypatch.setenv("EDGEGEN_CACHE", str(tmp_path / "cache"))
    hashed = []

    def counting(path, chunk=1 << 20):
        hashed.append(path.name)
        return real(path, chunk)

    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", counting)
    integrity.check_bundle(bundle, m)
    integrity.check_bundle(bundle, m)
    assert len(hashed) == len(m.files)  # normal: the second load hashes nothing
    monkeypatch.setattr(osinfo, "change_time_ns", lambda path, st: None)
    hashed.clear()
    integrity.check_bundle(bundle, m)
    integrity.check_bundle(bundle, m)
    assert len(hashed) == 2 * len(m.files)


def test_public_names_and_load(bundle_dir) -> None:
    bundle = bundle_dir("e2b-like")
    for name in ("load", "Generator", "Sampling", "Bundle", "EdgegenError"):
        assert name in edgegen.__all__ and hasattr(edgegen, name)
    gen = edgegen.load(bundle, threads=1, draft_tokens=3, hashes="never")
    assert isinstance(gen, edgegen.Generator) and isinstance(gen.bundle, edgegen.Bundle)
    assert gen.bundle.ep == "cpu"
    result = gen.generate([2, 40, 41, 42, 43, 44, 45], max_new_tokens=5, sampling=edgegen.Sampling())
    assert 1 <= len(result.token_ids) <= 5 and result.stats.drafted > 0
    with pytest.raises(edgegen.EdgegenError, match="unknown"):
        edgegen.load(bundle, ep="nope")
    with pytest.raises(edgegen.EdgegenError):
        edgegen.load(bundle.parent / "no-such-bundle")
    with pytest.raises(AttributeError):
        edgegen.no_such_name  # noqa: B018


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), re.M | re.S)


def test_readme_python_block_runs_on_the_demo(demo_env) -> None:
    """Each ```python block of the README, run as written (in a fresh interpreter, the demo bundle in the
    cache); then what it produced is checked."""
    blocks = readme_python_blocks()
    assert blocks and any("edgegen.load(" in b and "edgegen.Sampling(" in b for b in blocks)
    for block in blocks:
        probe = block + """
import json as _json
_seen = {k: v for k, v in dict(globals()).items() if not k.startswith("_")}
_out = {}
if "result" in _seen:
    _out["text"], _out["stats"] = result.text, result.stats.as_dict()
    _out["per_call"] = repr(result.stats.tokens_per_target_call)
if "gen" in _seen:
    _out["messages"] = gen.messages
print("\\n@@" + _json.dumps(_out))
"""
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL, env=demo_env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        printed, _, report = proc.stdout.rpartition("\n@@")
        out = json.loads(report)
        assert out["text"].strip() and out["text"] in printed  # the block printed its result
        assert out["stats"]["new_tokens"] >= 1 and out["stats"]["tokens_per_second"] > 0
        assert out["per_call"] in printed
        roles = [m["role"] for m in out["messages"]]
        assert roles == ["system", "user", "assistant"] and out["messages"][-1]["content"].strip()
        assert "exporting the demo pair" not in proc.stderr  # it used the cached demo bundle

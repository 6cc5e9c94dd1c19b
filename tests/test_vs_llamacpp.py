"""benchmarks/vs_llamacpp.py without llama.cpp: reading the patched example's output, token identity, the
converter's staging directory and bad flags (the benchmark itself needs a llama.cpp build; CI has none)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_llamacpp", REPO / "benchmarks" / "vs_llamacpp.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


# The example echoes the prompt's text to stdout without a final newline, so a BENCH_ line can follow text.
DECODE_OUT = """

<bos>import sys
import sys

BENCH_OUT_IDS: 90,295,19,204
BENCH_STATS: n_out=4 n_tgt_calls=2 decode_s=0.438696 after_first_s=0.422367 n_first_round=1 \
tgt_calls_after_first=1 tps_after_first=73.396 n_drafted=4 n_accept=3
"""
VERIFY_OUT = ("\n\n<bos>    finally:\n        notconn_pre_"
              "BENCH_VERIFY: ctx=63 k1=5 reps=20 t1_ms=0.967 tk_ms=1.435 ratio=1.484\n")


def test_parse_decode_lines(bench):
    got = bench.parse_bench_lines(DECODE_OUT)
    assert got["out_ids"] == [90, 295, 19, 204]
    assert got["stats"]["n_out"] == 4 and isinstance(got["stats"]["n_out"], int)
    assert got["stats"]["after_first_s"] == pytest.approx(0.422367)
    assert got["stats"]["n_accept"] == 3
    assert "verify" not in got


def test_parse_verify_line_after_echoed_text(bench):
    got = bench.parse_bench_lines(VERIFY_OUT)
    assert got["verify"] == {"ctx": 63, "k1": 5, "reps": 20, "t1_ms": 0.967, "tk_ms": 1.435, "ratio": 1.484}
    assert bench.parse_bench_lines("no bench output\n") == {}


def test_first_difference(bench):
    assert bench.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert bench.first_difference([1, 2], [1, 2, 3]) == 2
    ident = bench.identity([[1, 2], [3, 4]], [[1, 2], [3, 5]])
    assert ident == {"identical_prompts": 1, "prompts": 2, "first_difference": [None, 1]}


def test_stage_for_converter_adds_tokenizer_and_architecture(bench, tmp_path):
    target, assistant = tmp_path / "target", tmp_path / "assistant"
    target.mkdir()
    assistant.mkdir()
    (target / "tokenizer.json").write_text("{}")
    (assistant / "model.safetensors").write_bytes(b"weights")
    (assistant / "config.json").write_text(json.dumps({"model_type": "gemma4_assistant"}))
    staged = bench.stage_for_converter(assistant, target, tmp_path / "hf")
    assert (staged / "tokenizer.json").resolve() == (target / "tokenizer.json").resolve()
    assert (staged / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((staged / "config.json").read_text())["architectures"] == ["Gemma4AssistantForCausalLM"]
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(bench.BenchError, match="model_type 'llama'"):
        bench.stage_for_converter(target, target, tmp_path / "hf2")


@pytest.mark.parametrize("argv, message", [
    (["--threads", "two"], "--threads must be a comma list"),
    (["--policies", "spin"], "--policies takes default and/or passive"),
    (["--measure", "speed"], "--measure takes"),
    (["--rounds", "0"], "must be 1 or more"),
    (["--measure", "floor"], "--measure floor is compared with plain decoding"),
])
def test_bad_flags_are_one_line_errors(bench, argv, message):
    with pytest.raises(bench.BenchError, match=message):
        bench.parse_args(argv)


def test_ratios_compare_the_systems_under_the_same_thread_policy(bench):
    rows = [{"system": s, "kind": "plain", "threads": 2, "policy": p, "tokens_per_second": tps, "label": s}
            for s, p, tps in (("edgegen", "default", 24.0), ("edgegen", "passive", 18.0),
                              ("llama.cpp", "default", 20.0), ("llama.cpp", "passive", 12.0))]
    got = {(r["what"], r["policy"]): r["ratio"] for r in bench.ratios(rows)}
    assert got == {("plain tok/s", "default"): 1.2, ("plain tok/s", "passive"): 1.5}
    jobs = [(j.system, j.policy) for group in bench.jobs_for([2], ["default", "passive"], ["plain"]) for j in group]
    assert sorted(jobs) == sorted((s, p) for s in ("edgegen", "llama.cpp") for p in ("default", "passive"))


def test_floor_is_the_targets_matmuls_alone_and_its_ratio_is_against_llama_plain(bench, bundle_dir, tmp_path):
    """The floor graph holds the target's MatMulNBits nodes and nothing else, runs, and is timed beside the
    whole step; its ratio is llama.cpp's plain ms/token over the floor."""
    import onnx

    bundle = bundle_dir("e2b-like", True, quant="int4")
    full = [n for n in onnx.load(str(bundle / "target.onnx"), load_external_data=False).graph.node]
    only = bench.matmul_only_graph(bundle, tmp_path)
    nodes = onnx.load(str(only), load_external_data=False).graph.node
    assert [n.name for n in nodes] == [n.name for n in full if n.op_type == "MatMulNBits"] and nodes

    spec = {"bundle": str(bundle), "threads": 1, "spin": True, "kind": "floor", "draft_tokens": 4,
            "prompts": [[2, 10, 11, 12]], "verify_reps": 3}
    got = bench.edgegen_worker(spec)
    assert 0 < got["floor_ms"] and 0 < got["step_ms"]
    assert {p.name for p in tmp_path.iterdir()} == {"matmul_only.onnx", "target.weights", "shared.weights"}

    rows = [{"system": "llama.cpp", "kind": "plain", "threads": 1, "policy": "default", "ms_per_token": 50.0,
             "tokens_per_second": 20.0},
            {"system": "edgegen", "kind": "plain", "threads": 1, "policy": "default", "tokens_per_second": 16.0},
            {"system": "edgegen", "kind": "floor", "threads": 1, "policy": "default", "floor_ms": 40.0,
             "step_ms": 55.0}]
    got = {r["what"]: r["ratio"] for r in bench.ratios(rows)}
    assert got == {"plain tok/s": 0.8, "plain tok/s if only MatMulNBits cost time (floor)": 1.25}
    kinds = [j.kind for group in bench.jobs_for([1], ["default"], ["plain", "floor"]) for j in group]
    assert kinds == ["plain", "floor", "plain"]

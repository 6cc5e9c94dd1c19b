"""The QNN HTP profile (`edgegen export --ep qnn`), run on the HTP simulator of the onnxruntime-qnn wheel.

One export of the demo pair (max context 256) serves the module. What is checked: the graphs (target,
its prefill graph, the drafter's step and fused round) are static and standard-op QDQ and store each weight
once; drafting is one HTP call per round; long prompts go in prefill chunks; every node is placed on the
HTP with CPU fallback disabled; the draft/verify loop on the HTP gives exactly the HTP's plain greedy output;
the tokens agree with the CPU fp32 bundle (or the first divergence is a near tie there, reported with its logit
margin); acceptance is reported; precompiled context binaries load and give the same tokens. The host-side
masks are checked against their definition.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime_qnn", reason="the QNN EP plugin is installed by the 'ep' extra")

from edgegen.demo import DEMO_PAIR  # noqa: E402
from edgegen.runtime.generate import Generator  # noqa: E402
from edgegen.runtime.model import Bundle  # noqa: E402
from edgegen.runtime.providers import ort_name, placement  # noqa: E402
from edgegen.runtime.qnn import attention_mask  # noqa: E402

MAX_CONTEXT = 256
PROMPT = "def parse_args("
NEW_TOKENS = 12
CONTRIB_OPS = {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization", "MatMulNBits",
               "GatherBlockQuantized"}
GRAPHS = ("target", "prefill", "assistant", "draft_round")
NEAR_TIE = 1.0  # a first divergence from CPU fp32 is accepted only where fp32's own top-2 margin is below this


@pytest.fixture(scope="module")
def qnn_bundle(tmp_path_factory) -> Path:
    from edgegen.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("qnn") / "demo-qnn"
    export_bundle(str(DEMO_PAIR / "target"), str(DEMO_PAIR / "assistant"), out,
                  ExportOptions(ep="qnn", max_context=MAX_CONTEXT))
    return out


@pytest.fixture(scope="module")
def cpu_bundle(tmp_path_factory) -> Path:
    from edgegen.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("qnn") / "demo-cpu"
    export_bundle(str(DEMO_PAIR / "target"), str(DEMO_PAIR / "assistant"), out,
                  ExportOptions(max_context=MAX_CONTEXT, verify=False))
    return out


@pytest.fixture(scope="module")
def htp(qnn_bundle) -> Bundle:
    return Bundle(qnn_bundle, ep="qnn")


def test_graphs_are_static_standard_op_qdq(qnn_bundle):
    manifest = json.loads((qnn_bundle / "manifest.json").read_text())
    assert manifest["ep_profile"] == "qnn"
    for name in GRAPHS:
        model = onnx.load(str(qnn_bundle / f"{name}.onnx"), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, name
        assert not ops & CONTRIB_OPS, name
        assert {"QuantizeLinear", "DequantizeLinear", "MatMul", "Softmax"} <= ops, name
        for vi in [*model.graph.input, *model.graph.output]:
            assert all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim), (name, vi.name)
        inits = {t.name: t for t in model.graph.initializer}
        matrices = [inits[n.input[0]].data_type for n in model.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
        # Matrices (projections, embeddings) are int8; norm scales and scalars are 16-bit in the QNN config.
        assert matrices and set(matrices) == {onnx.TensorProto.INT8}, name
        io = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
        past = "past_key." + str(manifest["model"]["store_layers"]["full_attention"])
        assert io[past] == onnx.TensorProto.UINT16
        # The manifest names every IO dtype as numpy does (it once wrote uint16 as its enum value, "4").
        specs = {t["name"]: t["dtype"] for t in manifest["graphs"][name]["inputs"]}
        assert specs[past] == "uint16" and all(np.dtype(d).name == d for d in specs.values()), specs
    # One encoding per K/V buffer in both graphs: the host keeps its buffers quantized and feeds them as they are.
    io = manifest["static"]["quantized_io"]
    for drafter in ("assistant", "draft_round"):
        shared = [name for name in io[drafter] if name.startswith("past_")]
        assert shared and all(io[drafter][name] == io["target"][name] for name in shared)
    rows = manifest["static"]["query_rows"]
    assert rows == manifest["generation"]["draft_tokens"] + 1
    assert manifest["graphs"]["prefill"]["inputs"][0]["shape"] == [1, manifest["static"]["prefill_rows"]]
    parity = manifest["parity"]
    print(f"\nqnn export parity: {json.dumps({k: v for k, v in parity.items() if k != 'calibration'})}")
    # The standard-op graphs are exact: chunks of S rows and of P rows (last ones padded), past the sliding window.
    for key in ("fp32_static_vs_pytorch", "fp32_prefill_vs_pytorch"):
        assert parity[key]["max_abs_logit_error"] < 1e-4
        assert parity[key]["positions"] > manifest["model"]["sliding_window"]
    assert all(check["passed"] for check in parity["checks"].values())


def test_every_weight_is_stored_once(qnn_bundle):
    """The graphs share weight bytes: the target's embedding is stored once for the target, prefill, drafter
    and fused round (the drafter embeds with it); prefill and draft_round keep no weight file of their own."""
    import hashlib

    manifest = json.loads((qnn_bundle / "manifest.json").read_text())
    held: dict[str, tuple[str, str]] = {}
    embedding = {}
    for name in GRAPHS:
        model = onnx.load(str(qnn_bundle / f"{name}.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            e = {x.key: x.value for x in t.external_data}
            assert e["location"] in manifest["files"]
            start = int(e.get("offset", 0))
            raw = (qnn_bundle / e["location"]).read_bytes()[start:start + int(e["length"])]
            place = (e["location"], e.get("offset", "0"))
            assert held.setdefault(hashlib.sha256(raw).hexdigest(), place) == place, (name, t.name)
            if "embed_tokens" in t.name:
                embedding[name] = place
    assert len(set(embedding.values())) == 1 and embedding["target"][0] == "target.weights", embedding
    assert set(embedding) == set(GRAPHS)
    assert not (qnn_bundle / "prefill.weights").exists() and not (qnn_bundle / "draft_round.weights").exists()


def test_graph_io_is_named_by_the_manifest_module(qnn_bundle):
    """The static graphs' IO is what manifest.py names: IO constants, K/V buffers, new rows, RoPE and masks."""
    from edgegen.runtime import manifest as names

    m = names.load_manifest(qnn_bundle)
    known = set(names.DTYPES) | {names.mask_input(k) for k in names.LAYER_KINDS}
    known |= {n for k in names.LAYER_KINDS for n in names.rope_inputs(k)}
    known |= {n for b in m.model.kv_buffers for n in (*names.past_kv(b.layer), *names.new_kv(b.layer))}
    for spec in m.graphs.values():
        assert {t.name for t in spec.inputs + spec.outputs} <= known, spec.file


def test_every_node_runs_on_the_htp(qnn_bundle):
    """Placement with session.disable_cpu_ep_fallback=1: the session would fail to load with any CPU node."""
    report = Bundle(qnn_bundle, ep="qnn", strict=True, report_placement=True).placement_report()
    assert set(report) == {f"{name}.onnx" for name in GRAPHS}
    for name, placed in report.items():
        print(f"\n{name}: {placed['nodes']} -> {placed['share']:.1%} on QNN HTP")
        assert placed["share"] >= 0.95


def _cpu_logits(cpu_bundle: Path, ids: list[int]) -> np.ndarray:
    bundle = Bundle(cpu_bundle)
    cache = bundle.new_cache()
    return bundle.target.forward(cache, ids)[0][-1]


def test_speculative_equals_plain_on_htp_and_agrees_with_cpu(htp, cpu_bundle):
    ids = Generator(htp).tokenizer.encode(PROMPT)
    spec = Generator(htp, draft_tokens=4).generate(ids, NEW_TOKENS)
    plain = Generator(htp).generate(ids, NEW_TOKENS, use_assistant=False)
    st = spec.stats
    print(f"\nqnn htp: {st.drafted} drafted, {st.accepted} accepted ({st.accepted / st.drafted:.2f}), "
          f"{st.tokens_per_target_call:.2f} tokens per target call, acceptance by position "
          f"{st.as_dict()['acceptance_by_position']}")
    assert st.drafted > 0
    assert spec.token_ids == plain.token_ids

    cpu_spec = Generator(cpu_bundle, draft_tokens=4).generate(ids, NEW_TOKENS).stats
    print(f"cpu fp32: {cpu_spec.drafted} drafted, {cpu_spec.accepted} accepted "
          f"({cpu_spec.accepted / cpu_spec.drafted:.2f}), {cpu_spec.tokens_per_target_call:.2f} tokens per target call")
    cpu = Generator(cpu_bundle).generate(ids, NEW_TOKENS, use_assistant=False).token_ids
    first = next((i for i, (a, b) in enumerate(zip(cpu, plain.token_ids, strict=True)) if a != b), None)
    if first is None:
        print(f"qnn htp tokens equal CPU fp32 for all {NEW_TOKENS} tokens")
        return
    logits = _cpu_logits(cpu_bundle, ids + cpu[:first])
    margin = float(logits[cpu[first]] - logits[plain.token_ids[first]])
    print(f"first divergence from CPU fp32 at token {first}: fp32 logit margin {margin:.4f}")
    assert margin < NEAR_TIE


class _Calls:
    """Counts a graph's session calls."""

    def __init__(self, graph):
        self.n, run = 0, graph.run

        def counted(feeds, cache):
            self.n += 1
            return run(feeds, cache)

        graph.run = counted


def test_drafting_is_one_call_per_round_on_htp(qnn_bundle):
    """The fused draft_round drafts k greedy tokens in one HTP call; the single-step drafter (still in the
    bundle, for sampling) is not called. Greedy speculation with either equals plain decoding."""
    bundle = Bundle(qnn_bundle, ep="qnn")
    steps = bundle.draft_round.steps
    assert steps == bundle.target.rows - 1
    gen = Generator(bundle, draft_tokens=steps)
    ids = gen.tokenizer.encode(PROMPT)
    plain = gen.generate(ids, NEW_TOKENS, use_assistant=False).token_ids
    rounds, single = _Calls(bundle.draft_round), _Calls(bundle.assistant)
    gen.reset()
    fused = gen.generate(ids, NEW_TOKENS)
    rounds_run = fused.stats.drafted_by_position[0]  # rounds that drafted (the last may draft none)
    print(f"\nqnn htp fused round: {rounds.n} draft calls for {fused.stats.drafted} drafts in {rounds_run} rounds")
    assert fused.token_ids == plain
    assert rounds.n == rounds_run > 0 and single.n == 0 and fused.stats.drafted > rounds.n
    # Sampling drafts in single steps (the round is greedy: a quantized noisy argmax would not draw from q).
    from edgegen.runtime.sampling import Sampling

    gen.reset()
    before = rounds.n
    sampled = gen.generate(ids, 8, sampling=Sampling(temperature=0.8, seed=3))
    assert rounds.n == before and single.n == sampled.stats.drafted > 0
    bundle.draft_round = None  # greedy in single steps: k calls a round
    gen.reset()
    single.n = 0
    stepped = gen.generate(ids, NEW_TOKENS)
    assert stepped.token_ids == plain and single.n == stepped.stats.drafted


def test_long_prompt_to_a_full_context_on_the_cpu_ep(qnn_bundle):
    """The same QDQ graphs on the CPU EP (fast): a prompt past the sliding window, drafting until the
    static context is full. Speculative equals plain, and the run stops at the context, not with an error."""
    bundle = Bundle(qnn_bundle, ep="cpu")
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(4, bundle.manifest.model.vocab_size, MAX_CONTEXT - 40)]
    prefill = bundle.target.prefill
    assert prefill.rows == bundle.manifest.static["prefill_rows"] > bundle.target.rows
    calls = _Calls(prefill)
    spec = Generator(bundle, draft_tokens=4).generate(ids, 64)
    assert calls.n == -(-len(ids) // prefill.rows)  # the prompt in chunks of P rows, not S
    plain = Generator(bundle).generate(ids, 64, use_assistant=False)
    assert spec.token_ids == plain.token_ids
    assert spec.stop_reason == "context" or spec.token_ids[-1] in bundle.manifest.generation["eos_token_ids"]
    assert spec.stats.drafted > 0


def test_sampling_runs_the_same_loop_on_htp(htp):
    from edgegen.runtime.sampling import Sampling

    gen = Generator(htp, draft_tokens=4)
    ids = gen.tokenizer.encode(PROMPT)
    result = gen.generate(ids, 8, sampling=Sampling(temperature=0.8, seed=3))
    assert len(result.token_ids) == 8 and result.stats.drafted > 0
    assert all(0 <= t < htp.manifest.model.vocab_size for t in result.token_ids)


def test_context_binaries_load_and_match(qnn_bundle, htp, tmp_path):
    """Runs after the other HTP tests: in one process, creating a session for another SoC model reconfigures
    the simulator, and sessions made before it fail to execute (QNN error 1100) - so `want` comes first."""
    from edgegen.export.qnn import compile_context_binaries

    ids = Generator(htp).tokenizer.encode(PROMPT)
    want = Generator(htp).generate(ids, 4, use_assistant=False).token_ids
    copy = tmp_path / "ctx"
    shutil.copytree(qnn_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["static"]["context_binaries"] = compile_context_binaries(copy, "60")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    compiled = Bundle(copy, ep="qnn")
    assert placement(compiled.target.session).nodes == {ort_name("qnn"): 1}  # one EPContext node
    assert Generator(compiled).generate(ids, 4, use_assistant=False).token_ids == want


@pytest.mark.parametrize("sliding", [True, False])
def test_host_mask_matches_its_definition(sliding):
    window, past, rows, m = 4, 6, 3, 10
    pos = past + np.arange(rows)
    mask = attention_mask(sliding, window, past, pos, m, rows, -100.0)[0, 0]
    for r, p in enumerate(pos):
        for col in range(m + rows):
            key = col if col < m else past + col - m
            visible = (col < past or col >= m) and key <= p and (not sliding or p - key < window)
            assert (mask[r, col] == 0) == visible, (r, col)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgegen", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("extra", [["--ep", "qnn", "--quant", "int4"], ["--soc-model", "60"]])
def test_export_option_errors_are_one_line(tmp_path, extra):
    res = _cli("export", "--target", str(DEMO_PAIR / "target"), "--assistant", str(DEMO_PAIR / "assistant"),
               "--out", str(tmp_path / "out"), *extra)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_run_cpu_bundle_on_qnn_is_one_line(cpu_bundle):
    res = _cli("run", str(cpu_bundle), "--ep", "qnn", "-p", "x")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--ep qnn" in lines[0]

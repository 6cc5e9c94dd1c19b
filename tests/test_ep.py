"""Execution providers on this machine: the demo pair exported with each EP profile, run on that EP.

Per EP (cpu as the reference, webgpu through Mesa lavapipe, openvino on its CPU device): greedy speculative
output equals the same EP's plain decoding; plain tokens equal CPU fp32 (or the first divergence is a
near-tie, reported with its logit margin); acceptance is printed and recorded. WebGPU runs with
`session.disable_cpu_ep_fallback=1` (strict placement) and its placement report must show >= 95% of nodes on
WebGPU; OpenVINO's profile (standard-op attention and norms) must compile whole, strict as well.
A plugin EP's tests skip only when its package is not installed (CI installs them: .ci/run), or when the
hardware is why it has no device (OpenVINO's plugin lists only Intel devices; the skip names the CPU).
Installed with a device expected and none listed is a broken install: the tests run and fail on it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from edgegen.demo import DEMO_PAIR
from edgegen.runtime import providers
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.generate import Generator
from edgegen.runtime.model import Bundle

PROMPTS = ("def parse_args(argv=None):\n", "The standard library provides modules for ")
NEW_TOKENS = 24
DRAFT = 4  # fixed draft length: acceptance is measured on every round
MAX_CONTEXT = 256


_HARDWARE: dict[str, str | None] = {}  # ep -> providers.unsupported_hardware(ep), asked once per session


def needs(ep: str):
    if ep == "cpu":
        return []
    plugin = providers.PLUGINS[ep]
    if importlib.util.find_spec(plugin.module) is None:
        return [pytest.mark.skip(reason=f"{plugin.pip} is not installed (pip install -e .[ep])")]
    if ep not in _HARDWARE:
        _HARDWARE[ep] = providers.unsupported_hardware(ep)
    return [pytest.mark.skip(reason=_HARDWARE[ep])] if _HARDWARE[ep] else []


EPS = [pytest.param(ep, marks=needs(ep)) for ep in ("cpu", "webgpu", "openvino")]


@pytest.fixture(scope="module")
def demo_bundles(tmp_path_factory):
    """`demo_bundles(profile, quant="fp32") -> Path`: the demo pair exported (and verified) with that EP profile
    and weight format."""
    from edgegen.export.bundle import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("ep-bundles")
    cache: dict[tuple[str, str], Path] = {}

    def make(profile: str, quant: str = "fp32") -> Path:
        if (profile, quant) not in cache:
            out = root / (profile if quant == "fp32" else f"{profile}-{quant}")
            export_bundle(str(DEMO_PAIR / "target"), str(DEMO_PAIR / "assistant"), out,
                          ExportOptions(max_context=MAX_CONTEXT, ep=profile, quant=quant))
            cache[profile, quant] = out
        return cache[profile, quant]

    return make


@pytest.fixture(scope="module")
def cpu_reference(demo_bundles):
    """Plain greedy tokens of the cpu-profile bundle on the CPU EP, per prompt, and a CPU generator."""
    gen = Generator(demo_bundles("cpu"), ep="cpu")
    ids = [gen.tokenizer.encode(p) for p in PROMPTS]
    tokens = []
    for prompt in ids:
        gen.reset()
        tokens.append(gen.generate(prompt, NEW_TOKENS, use_assistant=False).token_ids)
    return ids, tokens, gen


def logit_margin(gen: Generator, ids: list[int]) -> float:
    """CPU target's top-1 minus top-2 logit after `ids`: how close to a tie the next token is."""
    gen.reset()
    logits, _ = gen.bundle.target.forward(gen.cache, ids)
    top = np.sort(logits[-1])[-2:]
    return float(top[1] - top[0])


@pytest.mark.parametrize("ep", EPS)
def test_speculative_equals_plain_and_cpu(ep: str, demo_bundles, cpu_reference, record_property) -> None:
    ids, reference, cpu_gen = cpu_reference
    bundle = Bundle(demo_bundles(ep), ep=ep, strict=ep != "cpu")  # every node on the EP, or no session
    assert bundle.ep == ep
    gen = Generator(bundle, draft_tokens=DRAFT)
    accepted = drafted = 0
    for prompt, ref in zip(ids, reference, strict=True):
        gen.reset()
        plain = gen.generate(prompt, NEW_TOKENS, use_assistant=False).token_ids
        gen.reset()
        spec = gen.generate(prompt, NEW_TOKENS)
        assert spec.token_ids == plain, f"{ep}: speculative output differs from plain decoding"
        accepted += spec.stats.accepted
        drafted += spec.stats.drafted
        if plain != ref:
            i = next(j for j, (a, b) in enumerate(zip(plain, ref, strict=False)) if a != b)
            margin = logit_margin(cpu_gen, prompt + ref[:i])
            print(f"{ep}: first divergence from CPU fp32 at token {i} (CPU logit margin {margin:.2e})")
            assert margin < 1e-3, f"{ep} diverges from CPU fp32 at token {i} where CPU's margin is {margin:.3g}"
    assert drafted > 0
    acceptance = accepted / drafted
    print(f"{ep}: acceptance {accepted}/{drafted} = {acceptance:.3f} (k={DRAFT})")
    record_property(f"acceptance_{ep}", round(acceptance, 4))
    assert acceptance > 0.1  # the distilled demo drafter works on every EP (CPU: ~0.35 at k=4)


@pytest.mark.parametrize("ep", [pytest.param(ep, marks=needs(ep)) for ep in ("webgpu", "openvino")])
def test_profile_places_every_node_on_its_ep(ep: str, demo_bundles, record_property) -> None:
    bundle = Bundle(demo_bundles(ep), ep=ep, strict=True, report_placement=True)
    report = bundle.placement_report()
    assert set(report) == {"target.onnx", "assistant.onnx", "draft_round.onnx"}
    for graph, placed in report.items():
        print(f"{ep} {graph}: {placed}")
        record_property(f"share_{ep}_{graph}", placed["share"])
        assert placed["share"] >= 0.95, f"{graph}: only {placed['share']:.1%} of nodes on {ep} ({placed['cpu_ops']})"


@pytest.mark.parametrize("ep", [pytest.param("webgpu", marks=needs("webgpu"))])
def test_cpu_profile_is_not_strict_clean_on_webgpu(ep: str, demo_bundles) -> None:
    """What the webgpu profile fixes: the cpu-profile graphs leave RoPE's Cast/Sin/Cos on the CPU."""
    placed = Bundle(demo_bundles("cpu"), ep=ep, report_placement=True).placement_report()["target.onnx"]
    assert {"Sin", "Cos"} <= set(placed["cpu_ops"]) and placed["share"] < 1.0
    with pytest.raises(EdgegenError, match="cannot run on webgpu"):
        Bundle(demo_bundles("cpu"), ep=ep, strict=True)


@pytest.mark.parametrize("ep", [pytest.param("openvino", marks=needs("openvino"))])
def test_cpu_profile_leaves_attention_on_cpu_under_openvino(ep: str, demo_bundles) -> None:
    """What the openvino profile fixes: OpenVINO has no GroupQueryAttention; each one splits the graph."""
    for graph, placed in Bundle(demo_bundles("cpu"), ep=ep, report_placement=True).placement_report().items():
        assert placed["cpu_ops"].get("GroupQueryAttention", 0) > 0, (graph, placed)
        assert placed["nodes"][providers.ort_name(ep)] > 1  # compiled in several partitions


@pytest.mark.parametrize("ep", [pytest.param(ep, marks=needs(ep)) for ep in ("webgpu", "openvino")])
def test_logits_match_cpu_fp32(ep: str, demo_bundles) -> None:
    """fp32 on the EP: OpenVINO's CPU device would use bf16 (logits off by ~0.04) without the f32 hint."""
    ids = list(range(10, 170))  # longer than the demo's sliding window (128): the window mask is exercised
    logits = {}
    for name in ("cpu", ep):
        bundle = Bundle(demo_bundles(ep), ep=name)
        logits[name] = bundle.target.forward(bundle.new_cache(), ids, logits_to_keep=len(ids))[0]
    diff = float(np.abs(logits[ep] - logits["cpu"]).max())
    print(f"{ep}: max |logits - CPU fp32| = {diff:.2e}")
    assert diff < 1e-3


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("ep", [pytest.param(ep, marks=needs(ep)) for ep in ("webgpu", "openvino")])
def test_quantized_bundle_runs_on_its_ep(ep: str, quant: str, demo_bundles) -> None:
    """int8 / int4 weights (MatMulNBits, GatherBlockQuantized; the drafter int8) exported for the EP's profile:
    every node on the EP with CPU fallback disabled, logits equal the same bundle on the CPU EP within the fp32
    tolerance above (exact compute: fp32 activations off the CPU profile), and greedy speculation equals plain."""
    path = demo_bundles(ep, quant)
    bundle = Bundle(path, ep=ep, strict=True, report_placement=True)
    assert bundle.manifest.graphs["target"].quantization["kind"] == quant
    for graph, placed in bundle.placement_report().items():
        assert placed["share"] >= 0.95, f"{graph}: only {placed['share']:.1%} of nodes on {ep} ({placed['cpu_ops']})"
    ids = list(range(10, 170))  # past the sliding window
    cpu = Bundle(path, ep="cpu")
    logits = {name: b.target.forward(b.new_cache(), ids, logits_to_keep=len(ids))[0]
              for name, b in (("cpu", cpu), (ep, bundle))}
    diff = float(np.abs(logits[ep] - logits["cpu"]).max())
    gen = Generator(bundle, draft_tokens=DRAFT)
    drafted = accepted = 0
    for prompt in PROMPTS:
        prompt_ids = gen.tokenizer.encode(prompt)
        gen.reset()
        plain = gen.generate(prompt_ids, NEW_TOKENS, use_assistant=False).token_ids
        gen.reset()
        spec = gen.generate(prompt_ids, NEW_TOKENS)
        assert spec.token_ids == plain, f"{ep} {quant}: speculative output differs from plain decoding"
        drafted, accepted = drafted + spec.stats.drafted, accepted + spec.stats.accepted
    print(f"{ep} {quant}: max |logits - same bundle on CPU| = {diff:.2e}, acceptance {accepted}/{drafted}")
    assert diff < 1e-3
    assert drafted > 0


def test_chunked_target_calls_equal_one_call(demo_bundles) -> None:
    """The WebGPU path feeds the target at most 16 tokens a call, in power-of-two chunks (checked on CPU)."""
    ids = list(range(10, 67))
    whole = Bundle(demo_bundles("cpu"))
    chunked = Bundle(demo_bundles("cpu"))
    chunked.target.max_chunk = 16
    for keep in (1, 5, len(ids)):
        a = whole.target.forward(whole.new_cache(), ids, keep)
        cache = chunked.new_cache()
        b = chunked.target.forward(cache, ids, keep)
        assert cache.length == len(ids)
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape and np.abs(x - y).max() < 1e-4


def test_auto_picks_the_bundles_profile_or_says_why(demo_bundles) -> None:
    ep, why = providers.choose("auto", "cpu")
    accelerators = [e for e in providers.AUTO_ORDER if _loads(e) and providers._is_accelerator(e)]
    assert ep == (accelerators[0] if accelerators else "cpu") and why
    if _loads("webgpu"):
        bundle = Bundle(demo_bundles("webgpu"), ep="auto")
        assert (bundle.ep, bundle.ep_reason) == ("webgpu", "the bundle was exported for webgpu")


def _loads(ep: str) -> bool:
    try:
        providers.devices(ep)
        return True
    except EdgegenError:
        return False


def test_missing_plugin_is_one_line_naming_the_package(monkeypatch) -> None:
    fake = providers.Plugin("no_such_module_edgegen", "onnxruntime-ep-webgpu")
    monkeypatch.setitem(providers.PLUGINS, "webgpu", fake)
    monkeypatch.setattr(providers, "_registered", {})
    with pytest.raises(EdgegenError, match="pip install onnxruntime-ep-webgpu") as err:
        providers.devices("webgpu")
    assert "\n" not in str(err.value)


def test_cpu_model_reads_the_first_processor(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel name\t: AMD EPYC {n}\n\n"
    info.write_text(block.format(n=0) + block.format(n=1))
    assert providers.cpu_model(str(info)) == ("AuthenticAMD", "AMD EPYC 0")
    vendor, model = providers.cpu_model(str(tmp_path / "absent"))  # not Linux: platform.processor()
    assert isinstance(vendor, str) and isinstance(model, str)


@pytest.mark.parametrize("cpu, hardware", [(("AuthenticAMD", "AMD EPYC"), True), (("GenuineIntel", "Xeon"), False),
                                           (("", ""), False)])
def test_openvino_without_a_device_names_the_cpu_or_the_install(cpu, hardware, monkeypatch) -> None:
    """No OpenVINO device on a non-Intel CPU is the hardware (one line naming the CPU, `auto` passes it by);
    on an Intel CPU, or an unknown one, it is a broken install. Needs no plugin: the registration is faked."""
    monkeypatch.setitem(providers._registered, "openvino", "OpenVINOExecutionProvider")
    cpu_only = [d for d in onnxruntime.get_ep_devices() if d.ep_name == providers.CPU_EP]
    monkeypatch.setattr(onnxruntime, "get_ep_devices", lambda: cpu_only)
    monkeypatch.setattr(providers, "cpu_model", lambda: cpu)
    expected = "only on Intel CPUs, GPUs and NPUs; this CPU is AuthenticAMD \\(AMD EPYC\\)" if hardware \
        else "OpenVINO found no device; check the onnxruntime-ep-openvino install"
    with pytest.raises(EdgegenError, match=expected) as err:
        providers.devices("openvino")
    assert "\n" not in str(err.value)
    assert providers.unsupported_hardware("openvino") == (str(err.value) if hardware else None)
    ep, why = providers.choose("auto", "openvino")
    assert ep == "cpu" and str(err.value) in why
    assert providers.choose("auto", "cpu")[0] != "openvino"


@pytest.mark.skipif(not providers.unsupported_hardware("openvino"), reason="OpenVINO lists a device here")
def test_cli_openvino_without_a_device_is_one_line(demo_bundles) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgegen", "bench", str(demo_bundles("cpu")), "--ep", "openvino"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {providers.unsupported_hardware('openvino')}"]


@pytest.mark.parametrize("ep", [pytest.param("webgpu", marks=needs("webgpu"))])
def test_no_adapter_names_the_vulkan_driver(ep: str, monkeypatch) -> None:
    providers.devices(ep)  # registered for real first
    monkeypatch.setattr(onnxruntime, "get_ep_devices", lambda: [])
    with pytest.raises(EdgegenError, match="no Vulkan adapter.*setup-ep.sh"):
        providers.devices(ep)


def test_one_list_of_eps() -> None:
    """providers.EPS names the EPs; the export profiles and the CLI's choices are keyed by it."""
    from edgegen.cli import ExportEP, RunEP
    from edgegen.export.graphs import PROFILES

    assert tuple(PROFILES) == providers.EPS
    assert tuple(e.value for e in ExportEP) == providers.EPS
    assert tuple(e.value for e in RunEP) == ("auto", *providers.EPS)


def test_unknown_ep_and_placement_from_graph_assignment(tmp_path) -> None:
    """Placement comes from onnxruntime's graph-assignment API, not its log text: a graph's nodes, counted
    per EP, with the op types left on the CPU EP."""
    import onnx
    from onnx import TensorProto, helper

    from edgegen.runtime.manifest import GraphSpec
    from edgegen.runtime.model import open_session

    with pytest.raises(EdgegenError, match="unknown; use one of"):
        providers.check_name("tpu")
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT), helper.make_node("Sin", ["c"], ["s"]),
             helper.make_node("Add", ["s", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "g.onnx"))
    placements: dict = {}
    open_session(tmp_path, GraphSpec("g.onnx", [], [], {}, {}), None, placements=placements)
    placed = placements["g.onnx"]
    assert placed.nodes == {"CPUExecutionProvider": 3}
    assert placed.cpu_ops == {"Cast": 1, "Sin": 1, "Add": 1}
    assert placed.share("CPUExecutionProvider") == 1.0 and placed.share("WebGpuExecutionProvider") == 0.0


def test_cli_ep_errors_are_one_line(demo_bundles) -> None:
    bundle = demo_bundles("cpu")
    for args in (["run", str(bundle), "-p", "x", "--ep", "tpu"], ["bench", str(bundle), "--ep", "cpu,tpu"]):
        proc = subprocess.run([sys.executable, "-m", "edgegen", *args], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


@pytest.mark.parametrize("ep", [pytest.param("webgpu", marks=needs("webgpu"))])
def test_cli_run_on_ep_matches_cpu(ep: str, demo_bundles) -> None:
    import json

    out = {}
    for name in ("cpu", ep):
        proc = subprocess.run([sys.executable, "-m", "edgegen", "run", str(demo_bundles(ep)), "-p", PROMPTS[0],
                               "-n", "12", "--ep", name, "--json"], capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out[ep]["ep"] == ep and out[ep]["token_ids"] == out["cpu"]["token_ids"]

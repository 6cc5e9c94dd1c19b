"""`edgegen export --ep qnn`: static standard-op graphs, QDQ-quantized for the QNN HTP backend (NPU).

  graphs     fp32 graphs of the qnn profile (graphs.py: static shapes) in a staging bundle `fp32/` inside the export dir
  calibrate  the staging bundle runs built-in prompts through the real runtime loop (prefill chunks,
             drafting, verify, decode) on the CPU EP; every graph call's inputs are recorded
  quantize   onnxruntime.quantization with the QNN config: uint16 activations, int8 symmetric
             per-channel weights, QDQ format (QuantizeLinear/DequantizeLinear pairs, all standard ops)
  verify     the QDQ graphs against the fp32 static graphs on the CPU EP (logit error, top-1 agreement,
             greedy continuation) and the fp32 static target against PyTorch
  binaries   optional (--soc-model): the QNN EP compiles each graph to an EP context model for that SoC
The staging bundle is deleted; the published bundle holds the QDQ graphs, host tables and the report.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from edgegen.export import contents
from edgegen.export.graphs import MASK_VALUE, PROFILES, build_assistant_graph, build_target_graph, host_inv_freqs
from edgegen.export.onnx_graph import WeightFile
from edgegen.export.quantize import Quant
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.manifest import SCHEMA_VERSION, Manifest, buffer_of, is_buffer

CALIBRATION_PROMPTS = (
    "The quick brown fox jumps over the lazy dog. Speculative decoding lets a small drafter propose "
    "several tokens that the large model verifies in a single pass.",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    "import os\nimport sys\n\n\nclass Config:\n    \"\"\"",
    "for i in range(10):\n    if i % 2 == 0:\n",
)
CALIBRATION_NEW_TOKENS = 24
GRAPHS = ("target", "prefill", "assistant", "draft_round")  # `target` first: the others share its weight bytes
# Query rows of the prefill graph: a 512-token prompt takes 8 calls instead of 103 at S = 5. A call's cost on
# the HTP grows with its rows, so short prompts (padded to P) pay for it; see README ("QNN").
PREFILL_ROWS = 64
MAX_SAMPLES = 96  # recorded calls per graph used for calibration (each holds a copy of the K/V buffers)
QDQ = {"kind": "qdq", "activations": "uint16", "weights": "int8 symmetric per tensor"}
MIN_QDQ_TOP1 = 0.9  # teacher-forced top-1 agreement of the QDQ target with its fp32 graph
FP32_ATOL = 1e-3  # the fp32 static target vs PyTorch (measured 9.5e-6 on the demo pair): graph bugs are far above


class _Recorder:
    """Records every run of a runtime graph (GraphSession.run) until `stop`: a copy of its inputs, K/V
    buffers included, and the range of every K/V buffer it read or wrote rows for."""

    def __init__(self, graph):
        self.graph, self.calls = graph, []
        self.kv_ranges: dict[str, tuple[float, float]] = {}  # K/V buffer -> (min, max) seen
        self._run = graph.run
        graph.run = self.run

    def run(self, feeds: dict, cache) -> dict:
        inputs = {**feeds, **cache.inputs(self.graph)}
        self.calls.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        out = self._run(feeds, cache)
        seen = [(k, v) for k, v in inputs.items() if is_buffer(k)]
        seen += [(buffer_of(k), v) for k, v in out.items() if buffer_of(k)]
        for name, value in seen:
            lo, hi = self.kv_ranges.get(name, (0.0, 0.0))
            self.kv_ranges[name] = (min(lo, float(value.min())), max(hi, float(value.max())))
        return out

    def stop(self) -> None:
        del self.graph.run  # the graph's own method again


class _Reader:
    """A CalibrationDataReader over recorded feeds."""

    def __init__(self, calls: list[dict]):
        self._it = iter(calls)

    def get_next(self):
        return next(self._it, None)


def _subsample(calls: list[dict]) -> list[dict]:
    if len(calls) <= MAX_SAMPLES:
        return calls
    keep = np.linspace(0, len(calls) - 1, MAX_SAMPLES).round().astype(int)
    return [calls[i] for i in keep]


def export_static(pair, opts, tmp: Path, max_context: int, stage) -> Manifest:
    """Build, calibrate, quantize and verify the qnn profile into `tmp`; returns the manifest."""
    cfg = pair.text_config
    rows = opts.draft_tokens_resolved(pair) + 1
    staging = tmp / "fp32"
    staging.mkdir()
    # fp32 graphs of the qnn profile (graphs.py): static shapes, host-side positions and K/V rows.
    fp32, profile = Quant("fp32"), PROFILES[opts.ep]
    shared = WeightFile(staging / "unused_shared.weights")  # a static graph stores its tables itself
    tgraph, plan, ple_table = build_target_graph(pair.weights, cfg, fp32, staging, shared, pair.lm_head, profile,
                                                 max_context, rows=rows)
    prefill_rows = max(rows, min(PREFILL_ROWS, max_context))
    graphs = [tgraph, build_target_graph(pair.weights, cfg, fp32, staging, shared, pair.lm_head, profile,
                                         max_context, rows=prefill_rows, name="prefill")[0]]
    for steps in (None, rows - 1):  # the single step, and the fused round of k = S - 1 steps
        graphs.append(build_assistant_graph(pair.assistant_weights, pair.assistant.config, pair.weights, cfg, plan,
                                            fp32, fp32, staging, shared, steps=steps, profile=profile,
                                            max_context=max_context)[0])
    for g in graphs:
        g.save(staging)
        g.data.close()
    shared.close()
    del tgraph, graphs

    stage("write")
    ple = contents.write_ple(tmp, ple_table, cfg.num_hidden_layers, Quant("fp32")) if ple_table is not None else None

    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model=contents.model_spec(cfg, plan, max_context, ple),
        graphs={},
        tokenizer=contents.copy_tokenizer(pair, tmp),
        generation=contents.generation_defaults(pair, rows - 1),
        ep_profile=opts.ep,
        static={"query_rows": rows, "prefill_rows": prefill_rows, "mask_value": MASK_VALUE,
                "inv_freq": host_inv_freqs(cfg, pair.assistant.config.get_text_config())},
    )
    contents.check_tokenizer(tmp, cfg.vocab_size)
    for name in GRAPHS:
        manifest.graphs[name] = contents.graph_spec(staging / f"{name}.onnx", {}, {"kind": "fp32"})
    _link_host_files(tmp, staging, manifest)
    contents.record_files(staging, manifest)  # the runtime checks sizes and hashes of what it loads

    calls, kv_ranges, report = _calibrate(staging, pair, manifest)
    stage("verify")
    for name in GRAPHS:
        _quantize(staging / f"{name}.onnx", tmp / f"{name}.onnx", _subsample(calls[name]), kv_ranges)
        manifest.static.setdefault("quantized_io", {})[name] = quantized_io(tmp / f"{name}.onnx")
        manifest.graphs[name] = contents.graph_spec(tmp / f"{name}.onnx", {}, QDQ)
    share_weights(tmp, GRAPHS)
    contents.record_files(tmp, manifest)
    qdq, check = _compare_qdq(staging, tmp, manifest)
    report.update(qdq)
    report["checks"].update(check)
    manifest.parity = report
    if opts.soc_model:
        manifest.static["context_binaries"] = compile_context_binaries(tmp, opts.soc_model)
        manifest.static["soc_model"] = str(opts.soc_model)
    shutil.rmtree(staging)
    failed = [f"{k} {v['value']:.3g} < {v['minimum']:.3g}" if "minimum" in v else
              f"{k} {v['value']:.3g} > {v['tolerance']:.3g}" for k, v in report["checks"].items() if not v["passed"]]
    if failed:
        raise EdgegenError(f"qnn export failed verification ({'; '.join(failed)}); please report this model")
    contents.record_files(tmp, manifest)
    return manifest


def _link_host_files(tmp: Path, staging: Path, manifest: Manifest) -> None:
    """The staging bundle shares the export dir's host files (PLE table, tokenizer): hard links, since a
    bundle may not point outside itself (runtime/integrity.py); a copy where links are not possible."""
    names = list(manifest.tokenizer.get("files", [])) + ([manifest.model.ple.file] if manifest.model.ple else [])
    for name in names:
        try:
            os.link(tmp / name, staging / name)
        except OSError:
            shutil.copy2(tmp / name, staging / name)


def _prompts(bundle: Path, vocab: int) -> list[list[int]]:
    from edgegen.export.verify import prompt_ids

    tok_file = bundle / "tokenizer.json"
    if not tok_file.is_file():
        return [prompt_ids(bundle, vocab, n, seed=n) for n in (40, 13, 7)]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    return [[t for t in tok.encode(p).ids if t < vocab] or [2] for p in CALIBRATION_PROMPTS]


def _calibrate(staging: Path, pair, manifest: Manifest) -> tuple[dict[str, list[dict]], dict, dict]:
    """Record graph inputs over built-in prompts (speculative greedy through the real loop on CPU), and
    check the fp32 static target against PyTorch on the first prompt."""
    import torch

    from edgegen.runtime.generate import Generator

    gen = Generator(staging, draft_tokens=manifest.static["query_rows"] - 1)
    bundle = gen.bundle
    graphs = {"target": bundle.target, "prefill": bundle.target.prefill, "assistant": bundle.assistant,
              "draft_round": bundle.draft_round}
    recorders = {name: _Recorder(graphs[name]) for name in GRAPHS}
    prompts = _prompts(staging, manifest.model.vocab_size)
    # Greedy drafting runs in the fused round; the single step (sampling) is recorded on the same prompts
    # with the round set aside.
    for ids in prompts:
        gen.reset()
        gen.generate(ids, max_new_tokens=CALIBRATION_NEW_TOKENS)
    fused, bundle.draft_round = bundle.draft_round, None
    for ids in prompts:
        gen.reset()
        gen.generate(ids, max_new_tokens=CALIBRATION_NEW_TOKENS)
    bundle.draft_round = fused
    # The prompts from position 0 in chunks of S rows too: generation gives them to the prefill graph, and a
    # target calibrated without the first positions (BOS) saturates there (QDQ top-1 vs fp32 0.95, not 1.0).
    rows = bundle.target.rows
    for ids in prompts:
        cache = bundle.new_cache()
        for a in range(0, len(ids), rows):
            bundle.target.forward(cache, ids[a:a + rows])
    # The static fp32 target against PyTorch, teacher-forced in chunks of S rows (with a padded last one)
    # over built-in text that runs past the sliding window.
    from edgegen.export.verify import prompt_ids

    m = manifest.model
    ids = prompt_ids(staging, m.vocab_size, min(m.sliding_window + 38, m.max_context - 1))
    # The prefill graph in chunks of P rows over it (recorded: prefill calibration sees K/V past the window).
    prefill = bundle.target.forward(bundle.new_cache(), ids, logits_to_keep=len(ids))[0]
    for recorder in recorders.values():
        recorder.stop()
    cache = bundle.new_cache()
    verify = np.concatenate([bundle.target.forward(cache, ids[a:a + rows], logits_to_keep=len(ids[a:a + rows]))[0]
                             for a in range(0, len(ids), rows)])
    with torch.no_grad():
        ref = pair.target(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    report = {"calibration": {"prompts": len(prompts),
                              **{f"{name}_calls": len(r.calls) for name, r in recorders.items()}}, "checks": {}}
    for key, got in (("fp32_static_vs_pytorch", verify), ("fp32_prefill_vs_pytorch", prefill)):
        err = float(np.abs(got - ref).max())
        report[key] = {"max_abs_logit_error": err, "positions": len(ids),
                       "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}
        report["checks"][key] = {"value": err, "tolerance": FP32_ATOL, "passed": err <= FP32_ATOL}
    kv_ranges = {}  # what the target wrote and read in either of its graphs
    for r in (recorders["target"], recorders["prefill"]):
        for name, (lo, hi) in r.kv_ranges.items():
            old = kv_ranges.get(name, (lo, hi))
            kv_ranges[name] = (min(lo, old[0]), max(hi, old[1]))
    return {name: r.calls for name, r in recorders.items()}, kv_ranges, report


def _quantize(src: Path, dst: Path, calls: list[dict], kv_ranges: dict[str, tuple[float, float]]) -> None:
    """QDQ with the QNN config. K/V buffer inputs get the range of everything the target wrote and read
    (not each graph's own calibration), so target and assistant share one encoding per buffer and the
    host can keep its buffers quantized (runtime/qnn.py)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    overrides = {name: [{"quant_type": QuantType.QInt8, "symmetric": True}] for name in _gathered_tables(src)}
    inputs = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
    overrides.update({name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                      for name, (lo, hi) in kv_ranges.items() if name in inputs})
    config = get_qnn_qdq_config(str(src), _Reader(calls), activation_type=QuantType.QUInt16,
                                weight_type=QuantType.QInt8, weight_symmetric=True, init_overrides=overrides)
    config.use_external_data_format = True
    quantize(str(src), str(dst), config)
    data = dst.with_name(dst.name + ".data")
    if data.exists():  # one weight file per graph, named like the CPU profile's
        data.rename(dst.with_suffix(".weights"))
        _relocate_external(dst, data.name, dst.with_suffix(".weights").name)


def quantized_io(path: Path) -> dict[str, dict]:
    """Move the boundary QuantizeLinear / DequantizeLinear of a QDQ graph to the host.

    A QDQ graph takes float inputs and quantizes them first (and dequantizes its outputs last); the
    QNN EP leaves those boundary nodes to the CPU EP. Here each float input read only by QuantizeLinear
    nodes of one scale becomes a uint16 input, each output made by DequantizeLinear a uint16 output, so
    every node of the graph can run on the HTP. Returns {tensor: {scale, zero_point, dtype}} for the host.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer if t.data_location != onnx.TensorProto.EXTERNAL}

    def params(node) -> tuple[float, int, int] | None:
        if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
            return None
        scale, zp = numpy_helper.to_array(inits[node.input[1]]), inits[node.input[2]]
        if scale.size != 1:
            return None
        return float(scale.reshape(-1)[0]), int(numpy_helper.to_array(zp).reshape(-1)[0]), zp.data_type

    def rename(old: str, new: str) -> None:
        for n in g.node:
            n.input[:] = [new if x == old else x for x in n.input]
            n.output[:] = [new if x == old else x for x in n.output]

    io: dict[str, dict] = {}
    drop = []
    for vi in g.input:
        readers = [n for n in g.node if vi.name in n.input]
        if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or not readers:
            continue
        if any(n.op_type != "QuantizeLinear" for n in readers) or len({params(n) for n in readers}) != 1:
            continue
        if params(readers[0]) is None:
            continue
        p = params(readers[0])
        for n in readers:
            drop.append(n)
            rename(n.output[0], vi.name)
        vi.type.tensor_type.elem_type = p[2]
        io[vi.name] = {"scale": p[0], "zero_point": p[1], "dtype": onnx.helper.tensor_dtype_to_np_dtype(p[2]).name}
    for vo in g.output:
        maker = next((n for n in g.node if vo.name in n.output), None)
        if maker is None or maker.op_type != "DequantizeLinear" or params(maker) is None:
            continue
        p = params(maker)
        quantized = maker.input[0]
        if any(vo.name in n.input for n in g.node):  # also read inside the graph: keep its DQ for that
            rename(vo.name, f"{vo.name}_float")
        else:
            drop.append(maker)
        rename(quantized, vo.name)
        vo.type.tensor_type.elem_type = p[2]
        io[vo.name] = {"scale": p[0], "zero_point": p[1], "dtype": onnx.helper.tensor_dtype_to_np_dtype(p[2]).name}
    for n in drop:
        g.node.remove(n)
    del g.value_info[:]  # element types changed along the moved paths; the loader infers them again
    onnx.save(model, str(path))
    return io


def _gathered_tables(path: Path) -> list[str]:
    """Float tables read by Gather (embeddings). The quantizer would treat them as 16-bit activations,
    and a 16-bit weight keeps the lm_head that reads the same table off the HTP: make them int8 weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return sorted({n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in floats})


def share_weights(bundle: Path, graphs: tuple[str, ...]) -> None:
    """Store each weight once: a graph's external tensor whose bytes an earlier graph already has reads them
    from that graph's file, and its own file keeps only the rest (deleted when nothing is left). The
    quantizer gives the same weight the same int8 bytes in every graph (one symmetric scale per tensor), so
    the target's embedding is stored once for the target, prefill, drafter and fused round, and prefill and
    draft_round store nothing of their own."""
    import hashlib

    import onnx

    held: dict[str, tuple[str, int, int]] = {}  # sha256 of a tensor's bytes -> (file, offset, length)
    for name in graphs:
        path = bundle / f"{name}.onnx"
        model = onnx.load(str(path), load_external_data=False)
        own = bundle / f"{name}.weights"
        data = own.read_bytes() if own.is_file() else b""
        kept = bytearray()
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            entry = {e.key: e.value for e in t.external_data}
            offset, length = int(entry.get("offset", 0)), int(entry["length"])
            raw = (bundle / entry["location"]).read_bytes()[offset:offset + length] if entry["location"] != own.name \
                else data[offset:offset + length]
            digest = hashlib.sha256(raw).hexdigest()
            if digest not in held:
                kept.extend(b"\0" * (-len(kept) % 64))  # aligned, as the quantizer writes them
                held[digest] = (own.name, len(kept), length)
                kept.extend(raw)
            location, offset, length = held[digest]
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
        onnx.save(model, str(path))
        if kept:
            own.write_bytes(bytes(kept))
        else:
            own.unlink(missing_ok=True)


def _relocate_external(model_path: Path, old: str, new: str) -> None:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(model, str(model_path))


def _compare_qdq(staging: Path, bundle: Path, manifest: Manifest) -> tuple[dict, dict]:
    """QDQ vs fp32 static graphs on the CPU EP, same token sequence: logits error and top-1 agreement
    (teacher-forced, one row per call like decoding; and the prefill graph over the same positions), and
    whether greedy decoding produces the same tokens.
    Returns (report, checks)."""
    from edgegen.runtime.generate import Generator

    fp32, qdq = Generator(staging, draft_tokens=0), Generator(bundle, draft_tokens=0)
    ids = _prompts(staging, manifest.model.vocab_size)[1]
    ref = fp32.generate(ids, max_new_tokens=CALIBRATION_NEW_TOKENS, use_assistant=False).token_ids
    got = qdq.generate(ids, max_new_tokens=CALIBRATION_NEW_TOKENS, use_assistant=False).token_ids
    seq = ids + ref
    logits, prefill = {}, {}
    for name, g in (("fp32", fp32), ("qdq", qdq)):
        cache = g.bundle.new_cache()
        logits[name] = np.concatenate([g.bundle.target.forward(cache, [t])[0] for t in seq])
        # the same positions through the prefill graph (one padded call of P rows here)
        prefill[name] = g.bundle.target.forward(g.bundle.new_cache(), seq, logits_to_keep=len(seq))[0]
    err = np.abs(logits["qdq"] - logits["fp32"])
    top1 = float((logits["qdq"].argmax(-1) == logits["fp32"].argmax(-1)).mean())
    prefill_err = np.abs(prefill["qdq"] - prefill["fp32"])
    prefill_top1 = float((prefill["qdq"].argmax(-1) == prefill["fp32"].argmax(-1)).mean())
    same = next((i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), len(ref))
    return {
        "qdq_vs_fp32": {"max_abs_logit_error": float(err.max()), "mean_abs_logit_error": float(err.mean()),
                        "top1_agreement": top1, "positions": len(seq),
                        "greedy_tokens_equal_prefix": same, "greedy_tokens": len(ref)},
        "qdq_prefill_vs_fp32": {"max_abs_logit_error": float(prefill_err.max()),
                                "mean_abs_logit_error": float(prefill_err.mean()), "top1_agreement": prefill_top1,
                                "positions": len(seq)},
    }, {"qdq_top1": {"value": top1, "minimum": MIN_QDQ_TOP1, "passed": top1 >= MIN_QDQ_TOP1},
        "qdq_prefill_top1": {"value": prefill_top1, "minimum": MIN_QDQ_TOP1, "passed": prefill_top1 >= MIN_QDQ_TOP1}}


def compile_context_binaries(bundle: Path, soc_model: str) -> dict[str, str]:
    """Precompile each QDQ graph with the QNN EP for `soc_model` into `<name>_ctx.onnx` (EP context model:
    the HTP binary embedded), so the device skips graph preparation at load."""
    from edgegen.runtime.manifest import load_manifest
    from edgegen.runtime.model import open_session
    from edgegen.runtime.providers import ort_name, placement

    graphs = load_manifest(bundle).graphs
    out = {}
    for name in GRAPHS:
        ctx = bundle / f"{name}_ctx.onnx"
        session = open_session(bundle, graphs[name], None, "qnn", options={"soc_model": str(soc_model)},
                               config={"ep.context_enable": "1", "ep.context_file_path": str(ctx),
                                       "ep.context_embed_mode": "1"})
        if set(placement(session).nodes) != {ort_name("qnn")} and not ctx.is_file():
            raise EdgegenError(f"the QNN EP did not compile '{name}' for SoC {soc_model}")
        del session
        if not ctx.is_file():
            raise EdgegenError(f"the QNN EP wrote no context binary for '{name}' (SoC model {soc_model})")
        out[name] = ctx.name
    return out

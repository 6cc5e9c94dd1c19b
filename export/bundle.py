"""`edgegen export`: load pair -> build graphs -> write bundle -> verify -> publish atomically.

Everything is written to a temporary directory beside OUT and renamed at the end; an error or an
interrupt at any stage removes it, so OUT is either a complete, verified bundle or untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from edgegen.export import audio, contents
from edgegen.export.graphs import (
    PROFILES,
    Profile,
    build_assistant_graph,
    build_target_graph,
    kv_ring,
    writes_kv,
)
from edgegen.export.onnx_graph import SHARED_FILE, WeightFile
from edgegen.export.quantize import Quant
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.manifest import (
    SCHEMA_VERSION,
    Manifest,
    draft_step,
    past_kv,
    present_kv,
)
from edgegen.runtime.osinfo import peak_rss_mb, process_alive

STAGES = ("load", "graphs", "write", "verify", "publish")


@dataclass
class ExportOptions:
    quant: str = "fp32"
    assistant_quant: str | None = None  # default: fp32 when the target is quantized below 8 bits
    block_size: int = 32
    max_context: int = 4096
    verify: bool = True
    force: bool = False
    draft_tokens: int | None = None  # steps of the fused draft_round graph [default: the assistant's own]
    ep: str = "cpu"  # execution-provider profile of the graphs: cpu, qnn, webgpu, openvino (graphs.PROFILES)
    soc_model: str | None = None  # qnn: precompile EP context binaries for this Qualcomm SoC model number
    # Quantized matmuls: exact (fp32 compute), int8 (int8 activations: faster on CPU; a verify row equals a
    # decode row bit for bit, at blocks over 32 with the runtime's even-row padding), or auto: int8 for
    # int8/int4 weights on the cpu profile at block size 32, 64 or 128, else exact (see compute_resolved).
    compute: str = "auto"
    kv_dtype: str = "fp32"  # K/V buffers: fp32, or fp16 (half the KV memory; cpu profile)

    def compute_resolved(self) -> str:
        if self.compute != "auto":
            return self.compute
        quantized = self.quant != "fp32" or self.assistant_quant_resolved() != "fp32"
        return "int8" if quantized and self.ep == "cpu" and self.block_size in (32, 64, 128) else "exact"

    def draft_tokens_resolved(self, pair) -> int:
        return self.draft_tokens or int(pair.assistant.generation_config.num_assistant_tokens)

    def assistant_quant_resolved(self) -> str:
        if self.assistant_quant:
            return self.assistant_quant
        # Drafters are kept at higher precision than an int4 target: acceptance suffers first.
        return {"fp32": "fp32", "int8": "int8", "int4": "int8"}[self.quant]


def check_out_dir(out: Path, force: bool, sources: tuple[str, ...] = ()) -> None:
    if out.exists() and not force:
        raise EdgegenError(f"'{out}' already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise EdgegenError(f"'{out}' exists and is not a directory; choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise EdgegenError(f"the parent directory of '{out}' does not exist; create it first")
    if not parent.is_dir():
        raise EdgegenError(f"'{parent}' is not a directory; choose another --out")
    if not os.access(parent, os.W_OK):
        raise EdgegenError(f"cannot write to '{parent}'; choose a writable --out")
    for src in sources:
        src_path = Path(src).expanduser().absolute()
        if src_path.exists() and (src_path == out or out in src_path.parents):
            raise EdgegenError(f"--out '{out}' would overwrite the model '{src}'; choose another --out")


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def _remove_stale_partials(out: Path) -> None:
    """Temp dirs of exports that were killed (SIGKILL can't be cleaned up by the process itself)."""
    for stale in out.parent.glob(_partial_prefix(out) + "*"):
        pid = stale.name[len(_partial_prefix(out)):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; an old bundle is only deleted once the new one is there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f"{_partial_prefix(out)}{os.getpid()}-old"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _aliases(layers, profile, steps: int | None = None) -> dict[str, str]:
    """present output -> the buffer it is bound to (its store layer's), for every layer that writes K/V."""
    out = {}
    for suffix in [""] if steps is None else [draft_step(i) for i in range(steps)]:
        for layer in filter(lambda la: writes_kv(la, profile), layers):
            out.update(zip(present_kv(layer.index, suffix), past_kv(layer.store), strict=True))
    return out


def export_bundle(target: str, assistant: str, out: str | Path, options: ExportOptions | None = None,
                  stage: Callable[[str], None] = lambda name: None) -> Manifest:
    """Export a verified bundle to `out`. Raises EdgegenError on any user-fixable problem."""
    from edgegen.export.loading import load_pair

    opts = options or ExportOptions()
    out = Path(out).expanduser().absolute()
    check_out_dir(out, opts.force, (target, assistant))
    _remove_stale_partials(out)
    profile = check_options(opts)

    started = time.monotonic()
    stage("load")
    pair = load_pair(target, assistant)
    cfg = pair.text_config
    if opts.max_context > cfg.max_position_embeddings:
        raise EdgegenError(f"--max-context {opts.max_context} is longer than the model's max_position_embeddings "
                           f"({cfg.max_position_embeddings}); use at most {cfg.max_position_embeddings}")
    if getattr(cfg, "enable_moe_block", False) and opts.ep != "cpu":
        # Each expert runs on a data-dependent number of rows, none for most (export/moe.py).
        why = ("its expert dispatch has data-dependent shapes" if profile.static_shapes else
               "the WebGPU EP fails on experts that no token chose" if opts.ep == "webgpu" else
               "its expert dispatch is not tested on this EP")
        raise EdgegenError(f"--ep {opts.ep} cannot run a mixture-of-experts target ({why}); export it with --ep cpu")

    tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(out)}{os.getpid()}-", dir=out.parent))
    try:
        stage("graphs")
        if profile.qdq:  # fp32 graphs calibrated and QDQ-quantized (export/qnn.py)
            from edgegen.export.qnn import export_static

            manifest = export_static(pair, opts, tmp, opts.max_context, stage)
        else:
            manifest = _export_dynamic(pair, opts, profile, tmp, stage)
        manifest.source = {"target": str(target), "assistant": str(assistant)}
        manifest.edgegen_version = contents.version()
        manifest.export = export_stats(started)
        contents.write_manifest(tmp, manifest)
        stage("publish")
        _publish(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_options(opts: ExportOptions) -> Profile:
    """The graphs' profile for these options; one EdgegenError line for options that do not fit together."""
    if opts.max_context < 16:
        raise EdgegenError(f"--max-context {opts.max_context} is too small; use at least 16")
    if opts.ep not in PROFILES:
        raise EdgegenError(f"--ep {opts.ep} is unknown; use one of {', '.join(PROFILES)}")
    if opts.soc_model and opts.ep != "qnn":
        raise EdgegenError("--soc-model precompiles QNN context binaries; use it with --ep qnn")
    if PROFILES[opts.ep].qdq and (opts.quant != "fp32" or opts.assistant_quant):
        raise EdgegenError("--ep qnn quantizes to QDQ itself (uint16 activations, int8 weights); "
                           "drop --quant / --assistant-quant")
    if opts.compute not in ("auto", "exact", "int8"):
        raise EdgegenError(f"--compute {opts.compute} is unknown; use auto, exact or int8")
    all_fp32 = opts.quant == "fp32" and opts.assistant_quant_resolved() == "fp32"
    if opts.compute == "int8" and (opts.ep != "cpu" or all_fp32):
        raise EdgegenError("--compute int8 speeds up int8/int4 weights on the cpu profile; "
                           "use it with --quant int8 or int4 and --ep cpu")
    if opts.kv_dtype not in ("fp32", "fp16"):
        raise EdgegenError(f"--kv-dtype {opts.kv_dtype} is unknown; use fp32 or fp16")
    if opts.kv_dtype == "fp16" and opts.ep != "cpu":
        raise EdgegenError(f"--kv-dtype fp16 is for the cpu profile; drop it with --ep {opts.ep}")
    return replace(PROFILES[opts.ep], kv_fp16=True) if opts.kv_dtype == "fp16" else PROFILES[opts.ep]


def _export_dynamic(pair, opts: ExportOptions, profile: Profile, tmp: Path, stage: Callable[[str], None]) -> Manifest:
    """The cpu, webgpu and openvino profiles: graphs, host tables and manifest into `tmp`, then verification."""
    level = 4 if opts.compute_resolved() == "int8" else 0
    tquant = Quant(opts.quant, opts.block_size, level)
    aquant = Quant(opts.assistant_quant_resolved(), opts.block_size, level)
    cfg, max_context = pair.text_config, opts.max_context
    steps = opts.draft_tokens_resolved(pair)
    plan, alayers, ple_table = _write_graphs(pair, profile, tquant, aquant, max_context, steps, tmp)
    vquant = _write_vision(pair, profile, tquant, tmp)

    stage("write")
    ple = contents.write_ple(tmp, ple_table, cfg.num_hidden_layers, tquant) if ple_table is not None else None
    del ple_table
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model=contents.model_spec(cfg, plan, max_context, ple, "float16" if profile.kv_fp16 else "float32"),
        graphs={},
        tokenizer=contents.copy_tokenizer(pair, tmp),
        generation=contents.generation_defaults(pair, steps),
        ep_profile=opts.ep,
    )
    contents.check_tokenizer(tmp, cfg.vocab_size)
    for name, aliases, q in (("target", _aliases(plan.layers, profile), tquant),
                             ("assistant", _aliases(alayers, profile), aquant),
                             ("draft_round", _aliases(alayers, profile, steps), aquant)):
        manifest.graphs[name] = contents.graph_spec(tmp / f"{name}.onnx", aliases, contents.quantization(q))
    if vquant is not None:
        from edgegen.export.vision import processor_settings

        manifest.graphs["vision"] = contents.graph_spec(tmp / "vision.onnx", {}, contents.quantization(vquant))
        manifest.vision = processor_settings(pair)
    if takes_soft_tokens(pair, profile) and audio.exports_audio(pair):  # its soft tokens need that target
        manifest.audio = audio.write_audio_graph(pair, audio.audio_quant(tquant), tmp, profile)
        manifest.graphs["audio"] = contents.graph_spec(tmp / "audio.onnx", {},
                                                       contents.quantization(audio.audio_quant(tquant)))
    contents.record_files(tmp, manifest)  # before verification, which loads the bundle the way the runtime will

    if opts.verify:
        stage("verify")
        _verify(pair, tmp, manifest, tquant, aquant, vquant)
    return manifest


def _write_graphs(pair, profile: Profile, tquant: Quant, aquant: Quant, max_context: int, steps: int, tmp: Path):
    """Build and save the target, assistant and draft_round graphs; returns (target plan, assistant layers,
    host PLE table or None). Weights stream from the checkpoints into the graphs' weight files, one tensor at
    a time."""
    cfg = pair.text_config
    shared = WeightFile(tmp / SHARED_FILE)
    # Sliding layers' ring length (0: full-length buffers); the drafter reads the same rings.
    ring = kv_ring(profile, [cfg.sliding_window, pair.assistant.config.get_text_config().sliding_window], max_context)
    tgraph, plan, ple_table = build_target_graph(pair.weights, cfg, tquant, tmp, shared, pair.lm_head, profile,
                                                 max_context, ring, soft_tokens=takes_soft_tokens(pair, profile))
    assistant_args = (pair.assistant_weights, pair.assistant.config, pair.weights, cfg, plan, aquant, tquant, tmp,
                      shared)
    agraph, alayers = build_assistant_graph(*assistant_args, profile=profile, max_context=max_context)
    rgraph, _ = build_assistant_graph(*assistant_args, steps=steps, data=agraph.data, profile=profile,
                                      max_context=max_context)
    for g in (tgraph, agraph, rgraph):
        g.save(tmp)
    for f in (tgraph.data, agraph.data, shared):
        f.close()
    return plan, alayers, ple_table


def _write_vision(pair, profile: Profile, tquant: Quant, tmp: Path) -> Quant | None:
    """The vision graph (export/vision.py) where the target takes soft tokens; its precision, or None."""
    from edgegen.export.vision import build_vision_graph, exports_vision, vision_quant

    if not (takes_soft_tokens(pair, profile) and exports_vision(pair)):
        return None
    vquant = vision_quant(tquant)
    shared = WeightFile(tmp / f"vision.{SHARED_FILE}")  # the tower shares no weight with the text graphs
    graph = build_vision_graph(pair, vquant, tmp, shared, profile)
    graph.save(tmp)
    graph.data.close()
    shared.close()
    if not graph.shared_names:
        (tmp / f"vision.{SHARED_FILE}").unlink()
    return vquant


def takes_soft_tokens(pair, profile: Profile) -> bool:
    """Whether the target graph takes embeddings at placeholder positions (graphs.soft_token_rows): for a
    checkpoint with a vision or audio tower, on the cpu profile. Text-only checkpoints' graphs stay as they were."""
    towers = any(getattr(pair.config, f"{m}_config", None) is not None for m in ("vision", "audio"))
    return towers and profile.name == "cpu"


def _verify(pair, tmp: Path, manifest: Manifest, tquant: Quant, aquant: Quant, vquant: Quant | None = None) -> None:
    """The bundle against PyTorch (export/verify.py, export/vision.py); the report goes into the manifest, a
    failed check raises."""
    from edgegen.export import verify

    manifest.parity = verify.verify_bundle(pair, tmp, manifest.model.max_context, tquant, aquant)
    if vquant is not None:
        from edgegen.export.vision import verify_vision

        report = verify_vision(pair, tmp / "vision.onnx", vquant)
        manifest.parity.setdefault("checks", {})["vision_soft_tokens"] = report.pop("vision_soft_tokens")
        manifest.parity["vision"] = report
    if "audio" in manifest.graphs:
        manifest.parity.setdefault("checks", {}).update(
            audio.verify_audio(pair.checkpoint, pair.config, tmp, audio.audio_quant(tquant), manifest.audio))
    contents.write_manifest(tmp, manifest)
    failed = [f"{k} {v['value']:.3g} > {v['tolerance']:.3g}" if "tolerance" in v else
              f"{k} {v['value']:.3g} < {v['minimum']:.3g}" if "minimum" in v else k
              for k, v in manifest.parity.get("checks", {}).items() if not v["passed"]]
    if failed and tquant.accuracy_level == 4:
        raise EdgegenError(f"export failed verification against PyTorch ({'; '.join(failed)}) with int8 "
                           "activations; export with --compute exact (fp32 activations), or report this model")
    if failed:
        raise EdgegenError(f"export failed verification against PyTorch ({'; '.join(failed)}); "
                           "please report this model")


def export_stats(started: float) -> dict:
    """Wall time since `started` and the process's peak resident set so far (the whole export's, verification
    included), for the manifest and `edgegen export --stats`."""
    stats = {"seconds": round(time.monotonic() - started, 1)}
    peak = peak_rss_mb()
    if peak is not None:  # unknown on an OS that has no call for it
        stats["peak_rss_mb"] = peak
    return stats

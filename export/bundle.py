"""`edgegen export`: load pair -> build graphs -> write bundle -> verify -> publish atomically.

Everything is written to a temporary directory beside OUT and renamed at the end; an error or an
interrupt at any stage removes it, so OUT is either a complete, verified bundle or untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgegen.export.graphs import (
    PROFILES,
    PLETable,
    build_assistant_graph,
    build_target_graph,
    kv_ring,
    writes_kv,
)
from edgegen.export.onnx_graph import SHARED_FILE, Graph, WeightFile
from edgegen.export.quantize import Quant, block_rows, pack, quantize_blocks, row_blocks
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.integrity import sha256_file as sha256
from edgegen.runtime.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    GraphSpec,
    KVBuffer,
    Manifest,
    ModelSpec,
    PLESpec,
    TensorSpec,
)
from edgegen.runtime.osinfo import peak_rss_mb, process_alive

STAGES = ("load", "graphs", "write", "verify", "publish")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")


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
    # Quantized matmuls: exact (fp32 compute), int8 (int8 activations: faster on CPU, and at block size 32 a
    # verify row equals a decode row bit for bit), or auto: int8 for int8/int4 weights on the cpu profile at
    # block size 32, else exact (see compute_resolved).
    compute: str = "auto"
    kv_dtype: str = "fp32"  # K/V buffers: fp32, or fp16 (half the KV memory; cpu profile)

    def compute_resolved(self) -> str:
        if self.compute != "auto":
            return self.compute
        quantized = self.quant != "fp32" or self.assistant_quant_resolved() != "fp32"
        return "int8" if quantized and self.ep == "cpu" and self.block_size == 32 else "exact"

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


def _specs(vis) -> list[TensorSpec]:
    from onnx import helper

    out = []
    for vi in vis:
        t = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append(TensorSpec(vi.name, str(helper.tensor_dtype_to_np_dtype(t.elem_type)), shape))
    return out


def _graph_spec(g: Graph, file: str, aliases: dict[str, str], quant: Quant) -> GraphSpec:
    quantization = {"kind": quant.kind, "block_size": quant.block_size if quant.bits else 0}
    if quant.bits:  # MatMulNBits compute: int8 activations (accuracy_level 4) or fp32
        quantization["compute"] = "int8" if quant.accuracy_level == 4 else "exact"
    return GraphSpec(file, _specs(g.inputs), _specs(g.outputs), aliases, quantization)


def _aliases(layers, profile, steps: int | None = None) -> dict[str, str]:
    out = {}
    for suffix in [""] if steps is None else [f".s{i}" for i in range(steps)]:
        for layer in filter(lambda la: writes_kv(la, profile), layers):
            out[f"present_key.{layer.index}{suffix}"] = f"past_key.{layer.store}"
            out[f"present_value.{layer.index}{suffix}"] = f"past_value.{layer.store}"
    return out


def _npy_writer(path: Path, shape: tuple[int, ...], dtype):
    """An open .npy file whose header is written; the caller appends the rows in order."""
    fh = path.open("wb")
    np.lib.format.write_array_header_1_0(
        fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return fh


def _write_ple(tmp: Path, table: PLETable, num_layers: int, quant: Quant) -> PLESpec:
    """The host PLE table (checkpoint rows times its scale), converted and quantized by row blocks straight
    into ple.npy (+ ple_scales.npy): E2B's 262,144 x 8,960 table is never in memory whole."""
    n, width = table.rows.shape
    dim = width // num_layers
    scale = np.float32(table.scale)
    blocks = ((rows * scale).astype(np.float32) for rows in row_blocks(table.rows, block_rows(table.rows)))
    if not quant.bits:
        with _npy_writer(tmp / "ple.npy", (n, width), np.float32) as fh:
            for rows in blocks:
                rows.tofile(fh)
        return PLESpec("ple.npy", num_layers, dim)
    block = quant.block_for(width)
    packed_width = width * quant.bits // 8
    with _npy_writer(tmp / "ple.npy", (n, packed_width), np.uint8) as codes_fh, \
            _npy_writer(tmp / "ple_scales.npy", (n, width // block), np.float32) as scales_fh:
        for rows in blocks:
            codes, scales = quantize_blocks(rows, quant.bits, block)
            pack(codes, quant.bits).tofile(codes_fh)
            scales.tofile(scales_fh)
    return PLESpec("ple.npy", num_layers, dim, quant.bits, block, "ple_scales.npy")


def _generation_defaults(pair, draft_tokens: int) -> dict:
    gc = pair.generation_config
    cfg = pair.text_config
    eos = gc.eos_token_id if gc.eos_token_id is not None else cfg.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return {"eos_token_ids": eos, "bos_token_id": gc.bos_token_id if gc.bos_token_id is not None else cfg.bos_token_id,
            "pad_token_id": gc.pad_token_id if gc.pad_token_id is not None else cfg.pad_token_id,
            "draft_tokens": draft_tokens}


def _copy_tokenizer(pair, tmp: Path) -> dict:
    files = []
    for name in TOKENIZER_FILES:
        src = Path(pair.target_dir) / name
        if src.is_file():
            shutil.copy2(src, tmp / name)
            files.append(name)
    template = "chat_template.jinja" if "chat_template.jinja" in files else None
    if template is None and "tokenizer_config.json" in files:
        cfg = json.loads((tmp / "tokenizer_config.json").read_text())
        if isinstance(cfg.get("chat_template"), str):
            (tmp / "chat_template.jinja").write_text(cfg["chat_template"])
            files.append("chat_template.jinja")
            template = "chat_template.jinja"
    return {"files": files, "chat_template": template}


def _check_tokenizer(tmp: Path, vocab_size: int) -> None:
    tok_file = tmp / "tokenizer.json"
    if not tok_file.is_file():
        return
    from tokenizers import Tokenizer

    try:
        n = Tokenizer.from_file(str(tok_file)).get_vocab_size()
    except Exception:
        raise EdgegenError("the target's tokenizer.json is not a valid tokenizer file") from None
    if n > vocab_size:
        raise EdgegenError(f"the target's tokenizer has {n} tokens but the model's vocabulary is {vocab_size}; "
                           "use the tokenizer the model was trained with")


def export_bundle(target: str, assistant: str, out: str | Path, options: ExportOptions | None = None,
                  stage: Callable[[str], None] = lambda name: None) -> Manifest:
    """Export a verified bundle to `out`. Raises EdgegenError on any user-fixable problem."""
    from edgegen.export.loading import load_pair

    opts = options or ExportOptions()
    out = Path(out).expanduser().absolute()
    check_out_dir(out, opts.force, (target, assistant))
    _remove_stale_partials(out)
    if opts.max_context < 16:
        raise EdgegenError(f"--max-context {opts.max_context} is too small; use at least 16")
    if opts.ep not in PROFILES:
        raise EdgegenError(f"--ep {opts.ep} is unknown; use one of {', '.join(PROFILES)}")
    if opts.soc_model and opts.ep != "qnn":
        raise EdgegenError("--soc-model precompiles QNN context binaries; use it with --ep qnn")
    if opts.ep == "qnn" and (opts.quant != "fp32" or opts.assistant_quant):
        raise EdgegenError("--ep qnn quantizes to QDQ itself (uint16 activations, int8 weights); "
                           "drop --quant / --assistant-quant")
    profile = PROFILES[opts.ep]
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
    if opts.kv_dtype == "fp16":
        profile = replace(profile, kv_fp16=True)
    level = 4 if opts.compute_resolved() == "int8" else 0
    tquant = Quant(opts.quant, opts.block_size, level)
    aquant = Quant(opts.assistant_quant_resolved(), opts.block_size, level)

    started = time.monotonic()
    stage("load")
    pair = load_pair(target, assistant)
    cfg = pair.text_config
    if opts.max_context > cfg.max_position_embeddings:
        raise EdgegenError(f"--max-context {opts.max_context} is longer than the model's max_position_embeddings "
                           f"({cfg.max_position_embeddings}); use at most {cfg.max_position_embeddings}")
    max_context = opts.max_context

    tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(out)}{os.getpid()}-", dir=out.parent))
    try:
        stage("graphs")
        if opts.ep == "qnn":
            from edgegen.export.qnn import export_static

            manifest = export_static(pair, opts, tmp, max_context, stage)
            _check_tokenizer(tmp, cfg.vocab_size)
            manifest.edgegen_version = _version()
            manifest.source = {"target": str(target), "assistant": str(assistant)}
            manifest.export = export_stats(started)
            stage("publish")
            _finish(tmp, out, manifest)
            return manifest
        # Weights stream from the checkpoints into the graphs' weight files, one tensor at a time.
        shared = WeightFile(tmp / SHARED_FILE)
        # Sliding layers' ring length (0: full-length buffers); the drafter reads the same rings.
        ring = kv_ring(profile, [cfg.sliding_window, pair.assistant.config.get_text_config().sliding_window],
                       max_context)
        tgraph, plan, ple_table = build_target_graph(pair.weights, cfg, tquant, tmp, shared, pair.lm_head, profile,
                                                     max_context, ring)
        assistant_args = (pair.assistant_weights, pair.assistant.config, pair.weights, cfg, plan, aquant, tquant, tmp,
                          shared)
        agraph, alayers = build_assistant_graph(*assistant_args, profile=profile, max_context=max_context)
        steps = opts.draft_tokens or int(pair.assistant.generation_config.num_assistant_tokens)
        rgraph, _ = build_assistant_graph(*assistant_args, steps=steps, data=agraph.data, profile=profile,
                                          max_context=max_context)

        stage("write")
        for g in (tgraph, agraph, rgraph):
            g.save(tmp)
        for f in (tgraph.data, agraph.data, shared):
            f.close()
        ple = _write_ple(tmp, ple_table, cfg.num_hidden_layers, tquant) if ple_table is not None else None
        del tgraph, agraph, rgraph, ple_table
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            model=model_spec(cfg, plan, max_context, ple, "float16" if profile.kv_fp16 else "float32"),
            graphs={},
            tokenizer=_copy_tokenizer(pair, tmp),
            generation=_generation_defaults(pair, steps),
            source={"target": str(target), "assistant": str(assistant)},
            edgegen_version=_version(),
            ep_profile=opts.ep,
        )
        _check_tokenizer(tmp, cfg.vocab_size)
        # Graph IO specs are re-read from the written models (what the runtime will really see).
        import onnx

        for name, aliases, q in (("target", _aliases(plan.layers, profile), tquant),
                                 ("assistant", _aliases(alayers, profile), aquant),
                                 ("draft_round", _aliases(alayers, profile, steps), aquant)):
            model = onnx.load(str(tmp / f"{name}.onnx"), load_external_data=False)
            manifest.graphs[name] = _graph_spec(_GraphIO(model.graph), f"{name}.onnx", aliases, q)
        _record_files(tmp, manifest)  # before verification, which loads the bundle the way the runtime will

        if opts.verify:
            stage("verify")
            from edgegen.export import verify

            manifest.parity = verify.verify_bundle(pair, tmp, max_context, tquant, aquant)
            _write_manifest(tmp, manifest)
            failed = [f"{k} {v['value']:.3g} > {v['tolerance']:.3g}" if "tolerance" in v else
                      f"{k} {v['value']:.3g} < {v['minimum']:.3g}" if "minimum" in v else k
                      for k, v in manifest.parity.get("checks", {}).items() if not v["passed"]]
            if failed and level == 4:
                raise EdgegenError(f"export failed verification against PyTorch ({'; '.join(failed)}) with int8 "
                                   "activations; export with --compute exact (fp32 activations), or report "
                                   "this model")
            if failed:
                raise EdgegenError(f"export failed verification against PyTorch ({'; '.join(failed)}); "
                                   "please report this model")

        manifest.export = export_stats(started)
        _write_manifest(tmp, manifest)
        stage("publish")
        _publish(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_stats(started: float) -> dict:
    """Wall time since `started` and the process's peak resident set so far (the whole export's, verification
    included), for the manifest and `edgegen export --stats`."""
    stats = {"seconds": round(time.monotonic() - started, 1)}
    peak = peak_rss_mb()
    if peak is not None:  # unknown on an OS that has no call for it
        stats["peak_rss_mb"] = peak
    return stats


def model_spec(cfg, plan, max_context: int, ple, kv_dtype: str = "float32") -> ModelSpec:
    """The manifest's model section: one K/V buffer pair per store (non-shared) layer of the target plan, a
    ring where the plan has one."""
    buffers = [KVBuffer(f"past_key.{layer.index}", layer.index, layer.kind, layer.kv_heads, layer.head_dim,
                        layer.ring or "max_context", kv_dtype)
               for layer in plan.layers if not layer.shared]
    return ModelSpec(cfg.vocab_size, cfg.hidden_size, list(cfg.layer_types), cfg.sliding_window, max_context,
                     dict(plan.store_layers), buffers, cfg.final_logit_softcapping, ple)


def _record_files(tmp: Path, manifest: Manifest) -> None:
    """Sizes and sha256 of every bundle file into the manifest (checked by the runtime at load)."""
    manifest.files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
                      for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
    _write_manifest(tmp, manifest)


def _finish(tmp: Path, out: Path, manifest: Manifest) -> None:
    _record_files(tmp, manifest)
    _publish(tmp, out)


def _graph_spec_from_file(path: Path, aliases: dict[str, str], quantization: dict) -> GraphSpec:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return GraphSpec(path.name, _specs(model.graph.input), _specs(model.graph.output), aliases, quantization)


class _GraphIO:
    def __init__(self, graph):
        self.inputs, self.outputs = graph.input, graph.output


def _write_manifest(tmp: Path, manifest: Manifest) -> None:
    (tmp / MANIFEST).write_text(manifest.to_json())


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edgegen")
    except Exception:
        return "0+unknown"

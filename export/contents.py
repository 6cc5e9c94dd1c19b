"""What a bundle holds besides its graphs, for every profile's export: the manifest's sections (model, graph
IO, generation defaults, file sizes and hashes), the host PLE table, and the tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edgegen.export.graphs import PLETable
from edgegen.export.quantize import Quant, block_rows, pack, quantize_blocks, row_blocks
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.integrity import sha256_file as sha256
from edgegen.runtime.manifest import MANIFEST, GraphSpec, KVBuffer, Manifest, ModelSpec, PLESpec, TensorSpec, past_kv

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")


def _specs(vis) -> list[TensorSpec]:
    from onnx import helper

    out = []
    for vi in vis:
        t = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append(TensorSpec(vi.name, str(helper.tensor_dtype_to_np_dtype(t.elem_type)), shape))
    return out


def quantization(quant: Quant) -> dict:
    """The manifest's `quantization` of a graph built with `quant`."""
    out = {"kind": quant.kind, "block_size": quant.block_size if quant.bits else 0}
    if quant.bits:  # MatMulNBits compute: int8 activations (accuracy_level 4) or fp32
        out["compute"] = "int8" if quant.accuracy_level == 4 else "exact"
    return out


def graph_spec(path: Path, aliases: dict[str, str], quantization: dict) -> GraphSpec:
    """A graph's manifest entry, its IO read back from the written model (what the runtime will really see)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return GraphSpec(path.name, _specs(model.graph.input), _specs(model.graph.output), aliases, quantization)


def write_manifest(tmp: Path, manifest: Manifest) -> None:
    (tmp / MANIFEST).write_text(manifest.to_json())


def _npy_writer(path: Path, shape: tuple[int, ...], dtype):
    """An open .npy file whose header is written; the caller appends the rows in order."""
    fh = path.open("wb")
    np.lib.format.write_array_header_1_0(
        fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return fh


def write_ple(tmp: Path, table: PLETable, num_layers: int, quant: Quant) -> PLESpec:
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


def generation_defaults(pair, draft_tokens: int) -> dict:
    gc = pair.generation_config
    cfg = pair.text_config
    eos = gc.eos_token_id if gc.eos_token_id is not None else cfg.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return {"eos_token_ids": eos, "bos_token_id": gc.bos_token_id if gc.bos_token_id is not None else cfg.bos_token_id,
            "pad_token_id": gc.pad_token_id if gc.pad_token_id is not None else cfg.pad_token_id,
            "draft_tokens": draft_tokens}


def copy_tokenizer(pair, tmp: Path) -> dict:
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


def check_tokenizer(tmp: Path, vocab_size: int) -> None:
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


def model_spec(cfg, plan, max_context: int, ple, kv_dtype: str = "float32") -> ModelSpec:
    """The manifest's model section: one K/V buffer pair per store (non-shared) layer of the target plan, a
    ring where the plan has one."""
    buffers = [KVBuffer(past_kv(layer.index)[0], layer.index, layer.kind, layer.kv_heads, layer.head_dim,
                        layer.ring or "max_context", kv_dtype)
               for layer in plan.layers if not layer.shared]
    return ModelSpec(cfg.vocab_size, cfg.hidden_size, list(cfg.layer_types), cfg.sliding_window, max_context,
                     dict(plan.store_layers), buffers, cfg.final_logit_softcapping, ple)


def record_files(tmp: Path, manifest: Manifest) -> None:
    """Sizes and sha256 of every bundle file into the manifest (checked by the runtime at load)."""
    manifest.files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
                      for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_manifest(tmp, manifest)


def version() -> str:
    try:
        from importlib.metadata import version as installed

        return installed("edgegen")
    except Exception:
        return "0+unknown"

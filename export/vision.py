"""The vision tower as its own graph: one image's patches -> its soft tokens in the text model's space.

transformers' Gemma4VisionModel + Gemma4MultimodalEmbedder, op by op (like export/graphs.py, weights read one
tensor at a time from the checkpoint):
  patch embedder   2 * (pixels - 0.5) @ input_proj + position_table[0][x] + position_table[1][y]
  encoder layers   bidirectional attention (scale 1, q/k RMS-normed with weights, v without) with axial 2-D
                   RoPE (the first half of each head rotates by x, the second by y), gated GELU MLP; every
                   linear clamps its input and output where the checkpoint sets clip bounds (ClippableLinear)
  pooler           average of each k x k block of patches (the host's `pooling` weights), times sqrt(hidden);
                   standardized where the config says so
  embedder         scale-free RMSNorm, projection to the text width
The graph runs one image's real patches only (transformers pads every image to max_patches and masks the
padding: the same values). The host (runtime/vision.py) feeds the patches, their (x, y) positions and the
pooling weights, all computed from the image size. Checkpoints that attend bidirectionally inside an image in
the text model (use_bidirectional_attention "vision": the larger Gemma 4 models, not E2B/E4B) get no vision
graph: the target graphs attend causally.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edgegen.export.graphs import _input, _output, _rms_noscale, apply_rope, rms_norm
from edgegen.export.onnx_graph import Graph, WeightFile
from edgegen.export.quantize import Linears, Quant
from edgegen.export.weights import Weights
from edgegen.runtime.manifest import PIXEL_POSITIONS, PIXEL_VALUES, POOLING, SOFT_TOKENS

TOWER, EMBEDDER = "model.vision_tower.", "model.embed_vision."
# Image processor settings the runtime needs, with Gemma4ImageProcessor's defaults (transformers 5.24).
PROCESSOR_DEFAULTS = {"patch_size": 16, "pooling_kernel_size": 3, "max_soft_tokens": 280, "do_resize": True,
                      "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False,
                      "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "do_convert_rgb": True}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's codes


def exports_vision(pair) -> bool:
    """Whether the checkpoint's vision tower gets a graph (see the module docstring)."""
    if getattr(pair.config, "vision_config", None) is None or f"{EMBEDDER}embedding_projection.weight" not in \
            pair.checkpoint:
        return False
    if not placeholders_in_vocab(pair, "image_token_id"):
        return False  # no prompt could hold an image (random test checkpoints with a cut vocabulary)
    return getattr(pair.text_config, "use_bidirectional_attention", None) != "vision"


def placeholders_in_vocab(pair, *names: str) -> bool:
    """Whether the checkpoint's media placeholder ids are tokens of its text model at all."""
    return all(0 <= int(getattr(pair.config, n, -1) or -1) < pair.text_config.vocab_size for n in names)


def vision_quant(target: Quant) -> Quant:
    """fp32 with an fp32 target; int8 (fp32 compute) otherwise: the tower runs once per image, and its
    output feeds every later token, so it is kept at the drafter's precision, not int4."""
    return target if target.kind == "fp32" else Quant("int8", target.block_size, 0)


def _clipped(g: Graph, lin: Linears, x: str, w: Weights, name: str, prefix: str) -> str:
    """Gemma4ClippableLinear: clamp the input, project, clamp the output (bounds +-inf: no clamp)."""
    sub = w.sub(name)

    def clip(v: str, lo: str, hi: str) -> str:
        if lo not in sub:
            return v
        a, b = float(sub.array(lo)), float(sub.array(hi))
        if math.isinf(a) and math.isinf(b):
            return v
        return g.op("Clip", v, g.const(np.float32(a), np.float32), g.const(np.float32(b), np.float32))

    y = lin(clip(x, "input_min", "input_max"), f"{prefix}.{name}", sub["linear.weight"])
    return clip(y, "output_min", "output_max")


def _axial_rope(g: Graph, positions: str, inv_freq: np.ndarray) -> tuple[str, str]:
    """cos/sin [1, N, 1, d] for patch positions [1, N, 2]: Gemma4VisionRotaryEmbedding's H-H-W-W layout."""
    pos = g.op("Unsqueeze", g.op("Cast", positions, to=1), g.const([-1]))  # [1, N, 2, 1] float
    freqs = g.op("Mul", pos, g.weight("vision.inv_freq", inv_freq.astype(np.float32)))  # [1, N, 2, d/4]
    fx, fy = (g.op("Gather", freqs, g.const(i), axis=2) for i in (0, 1))
    emb = g.op("Unsqueeze", g.op("Concat", fx, fx, fy, fy, axis=-1), g.const([2]))
    return g.op("Cos", emb), g.op("Sin", emb)


def _rope_2d(g: Graph, x: str, cos: str, sin: str) -> str:
    """apply_multidimensional_rope with two axes: each half of the head dim rotates on its own."""
    halves = [g.op("Split", t, axis=-1, num_outputs=2, out=2) for t in (x, cos, sin)]
    return g.op("Concat", *(apply_rope(g, halves[0][i], halves[1][i], halves[2][i]) for i in (0, 1)), axis=-1)


def _attention(g: Graph, lin: Linears, x: str, w: Weights, cfg, cos: str, sin: str, prefix: str) -> str:
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group, eps = heads // kv, cfg.rms_norm_eps

    def project(name: str, n: int) -> str:
        return g.op("Reshape", _clipped(g, lin, x, w, name, prefix), g.const([1, -1, n, d]))

    q = _rope_2d(g, rms_norm(g, project("q_proj", heads), w.array("q_norm.weight"), f"{prefix}.q_norm", eps), cos, sin)
    k = _rope_2d(g, rms_norm(g, project("k_proj", kv), w.array("k_norm.weight"), f"{prefix}.k_norm", eps), cos, sin)
    v = _rms_noscale(g, project("v_proj", kv), eps)
    q = g.op("Transpose", g.op("Reshape", q, g.const([1, -1, kv, group, d])), perm=[0, 2, 3, 1, 4])  # [1,kv,g,N,d]
    k = g.op("Transpose", g.op("Unsqueeze", k, g.const([3])), perm=[0, 2, 3, 4, 1])  # [1,kv,1,d,N]
    v = g.op("Transpose", g.op("Unsqueeze", v, g.const([3])), perm=[0, 2, 3, 1, 4])  # [1,kv,1,N,d]
    probs = g.op("Softmax", g.op("MatMul", q, k), axis=-1)  # scale 1: q and k are normed; every patch sees all
    out = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 3, 1, 2, 4])  # [1, N, kv, g, d]
    return _clipped(g, lin, g.op("Reshape", out, g.const([1, -1, heads * d])), w, "o_proj", prefix)


def _layer(g: Graph, lin: Linears, x: str, w: Weights, cfg, cos: str, sin: str, prefix: str) -> str:
    eps = cfg.rms_norm_eps
    h = rms_norm(g, x, w.array("input_layernorm.weight"), f"{prefix}.input_layernorm", eps)
    h = _attention(g, lin, h, w.sub("self_attn"), cfg, cos, sin, f"{prefix}.self_attn")
    x = g.op("Add", x, rms_norm(g, h, w.array("post_attention_layernorm.weight"), f"{prefix}.post_attention_layernorm",
                                eps))
    h = rms_norm(g, x, w.array("pre_feedforward_layernorm.weight"), f"{prefix}.pre_feedforward_layernorm", eps)
    mlp = w.sub("mlp")
    gate = g.op("Gelu", _clipped(g, lin, h, mlp, "gate_proj", f"{prefix}.mlp"), approximate="tanh")
    h = _clipped(g, lin, g.op("Mul", gate, _clipped(g, lin, h, mlp, "up_proj", f"{prefix}.mlp")), mlp, "down_proj",
                 f"{prefix}.mlp")
    return g.op("Add", x, rms_norm(g, h, w.array("post_feedforward_layernorm.weight"),
                                   f"{prefix}.post_feedforward_layernorm", eps))


def inv_freq(cfg) -> np.ndarray:
    """The axial RoPE frequencies, from transformers' own rotary module for this config."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionRotaryEmbedding

    return Gemma4VisionRotaryEmbedding(cfg).inv_freq.float().numpy()


def build_vision_graph(pair, quant: Quant, out_dir: Path, shared: WeightFile, profile) -> Graph:
    """`vision.onnx`: pixel_values [1, N, 3p^2], pixel_positions [1, N, 2], pooling [1, T, N] -> soft_tokens [T, H]."""
    cfg, text_hidden = pair.config.vision_config, pair.text_config.hidden_size
    w, e = Weights(pair.checkpoint, TOWER), Weights(pair.checkpoint, EMBEDDER)
    g = Graph("vision", out_dir, shared, profile=profile)
    lin = Linears(g, quant)
    pixels = _input(g, PIXEL_VALUES, [1, "N", 3 * cfg.patch_size**2])
    positions = _input(g, PIXEL_POSITIONS, [1, "N", 2])
    pooling = _input(g, POOLING, [1, "T", "N"])

    x = g.op("Mul", g.op("Sub", pixels, g.const(np.float32(0.5), np.float32)), g.const(np.float32(2.0), np.float32))
    x = lin(x, "patch_embedder.input_proj", w["patch_embedder.input_proj.weight"])
    table = w.array("patch_embedder.position_embedding_table")
    x_emb, y_emb = (g.op("Gather", g.weight(f"patch_embedder.position_{a}", np.ascontiguousarray(table[i])),
                         g.op("Gather", positions, g.const(i), axis=2), axis=0) for i, a in enumerate("xy"))
    x = g.op("Add", x, g.op("Add", x_emb, y_emb))
    cos, sin = _axial_rope(g, positions, inv_freq(cfg))
    for i in range(cfg.num_hidden_layers):
        x = _layer(g, lin, x, w.sub(f"encoder.layers.{i}"), cfg, cos, sin, f"vision.layers.{i}")

    x = g.op("Mul", g.op("MatMul", pooling, x), g.const(np.float32(cfg.hidden_size**0.5), np.float32))
    if cfg.standardize:
        x = g.op("Mul", g.op("Sub", x, g.weight("std_bias", w.array("std_bias"))), g.weight("std_scale",
                                                                                             w.array("std_scale")))
    x = lin(_rms_noscale(g, x, cfg.rms_norm_eps), "embed_vision.embedding_projection",
            e["embedding_projection.weight"])
    _output(g, g.op("Reshape", x, g.const([-1, text_hidden])), SOFT_TOKENS, ["T", text_hidden])
    return g


def processor_settings(pair) -> dict:
    """The manifest's `vision` section: the image processor settings saved with the checkpoint
    (processor_config.json's image_processor, else preprocessor_config.json), Gemma4ImageProcessor's defaults
    for what is not saved, and the media token ids."""
    saved: dict = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = Path(pair.target_dir) / name
        if path.is_file():
            d = json.loads(path.read_text())
            d = d.get("image_processor", d if name == "preprocessor_config.json" else {})
            if "Gemma4" in str(d.get("image_processor_type", "")):
                saved = d
                break
    s = {k: saved.get(k, v) for k, v in PROCESSOR_DEFAULTS.items()}
    s["resample"] = _RESAMPLE[int(s["resample"])]
    s["rescale_factor"] = float(s["rescale_factor"])
    s["image_mean"], s["image_std"] = ([float(x) for x in s[k]] for k in ("image_mean", "image_std"))
    for k in ("image_token_id", "boi_token_id", "eoi_token_id"):
        s[k] = int(getattr(pair.config, k))
    pad = pair.text_config.pad_token_id
    s["pad_token_id"] = int(pad if pad is not None else 0)
    return s


# -- verification ------------------------------------------------------------------------------------------

VISION_ATOL = 1e-4  # relative to the largest soft-token value (fp32), the contract of issue 15
MIN_VISION_SQNR_DB = 25.0  # int8 weights: judged by signal-to-noise against the fp32 tower


def pytorch_tower(pair):
    """transformers' Gemma4VisionModel and Gemma4MultimodalEmbedder with the checkpoint's weights, fp32, read
    tensor by tensor (the text model is never loaded)."""
    import torch
    from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder, Gemma4VisionModel

    tower = Gemma4VisionModel(pair.config.vision_config).float().eval()
    embedder = Gemma4MultimodalEmbedder(pair.config.vision_config, pair.text_config).float().eval()
    for module, prefix in ((tower, TOWER), (embedder, EMBEDDER)):
        state = {k: torch.from_numpy(np.array(pair.checkpoint.get(prefix + k), np.float32))
                 for k in module.state_dict() if prefix + k in pair.checkpoint}
        module.load_state_dict(state, strict=False)
    return tower, embedder


def verify_vision(pair, graph: Path, quant: Quant) -> dict:
    """The vision graph file `graph` against transformers on three synthetic images of different aspect ratios,
    preprocessed by transformers' own image processor (and by the runtime's preprocessing for the graph);
    returns the report for manifest.parity."""
    import onnxruntime as ort
    import torch
    from PIL import Image
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from edgegen.runtime.model import session_options
    from edgegen.runtime.vision import VisionEncoder

    settings = processor_settings(pair)
    keys = ("patch_size", "pooling_kernel_size", "max_soft_tokens")
    processor = Gemma4ImageProcessorPil(**{k: settings[k] for k in keys})
    tower, embedder = pytorch_tower(pair)
    encoder = VisionEncoder(ort.InferenceSession(str(graph), session_options(None)), settings)
    rng = np.random.default_rng(0)
    worst, sqnr = 0.0, float("inf")
    for h, w_ in ((96, 160), (240, 120), (200, 200)):
        image = Image.fromarray(rng.integers(0, 256, (h, w_, 3), dtype=np.uint8))
        inputs = processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            ref = embedder(tower(pixel_values=inputs["pixel_values"],
                                 pixel_position_ids=inputs["image_position_ids"]).last_hidden_state).numpy()
        got = encoder.encode(encoder.preprocess(image))
        if got.shape != ref.shape:
            raise AssertionError(f"vision graph returned {got.shape}, PyTorch {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max())))
        sqnr = min(sqnr, float(10 * np.log10((ref**2).sum() / max(((got - ref) ** 2).sum(), 1e-30))))
    encoder.close()
    if quant.kind == "fp32":
        check = {"value": worst, "tolerance": VISION_ATOL, "passed": worst <= VISION_ATOL}
    else:
        check = {"value": sqnr, "minimum": MIN_VISION_SQNR_DB, "passed": sqnr >= MIN_VISION_SQNR_DB}
    return {"vision_soft_tokens": check, "vision_max_rel_diff": worst, "vision_sqnr_db": round(sqnr, 2)}

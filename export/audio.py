"""Gemma 4's audio tower (`Gemma4AudioModel` + the audio `Gemma4MultimodalEmbedder`) as one ONNX graph.

  in   input_features [1, F, 128] float32: log-mel frames of one clip, valid frames only (runtime/audio.py)
  out  soft_tokens [N, H] float32: N = ceil(ceil(F / 2) / 2) soft tokens in the text model's space, the rows
       that replace the prompt's N `<|audio|>` placeholders

The tower is a conformer: two stride-2 3x3 convolutions over (time, mel) with LayerNorm + ReLU, a linear
projection, then layers of half-step feed-forward, local self-attention, a causal depthwise "light"
convolution and a second feed-forward, then an output projection; the embedder is a scale-free RMS norm and
a linear map to the text width. Transformers' attention works on blocks of `attention_chunk_size` queries,
each reading a context window around its block, with a relative-position term shifted into place
(Transformer-XL's rel-shift). Written here as one [N, N] masked attention: the keys a query sees are
q - (left - 2) .. q + right - 1 (transformers' mask), the relative term is gathered by distance from a
[N, P] product, and outside the window the logit is the same -1e9 transformers writes, so the softmax is
the same sum in another order.

Only valid frames go in: a clip's frames after its last sample are masked in transformers and, as the
convolutions see zeros there and attention and the light convolution look only backwards (right context 0
in the published configs), its valid tokens equal the tokens of the clip fed alone; this module checks
that equality against PyTorch with padding (verify_audio).

Weights stream from the checkpoint like the text graphs (export/weights.py); the linear layers use the
bundle's MatMul quantization, convolutions and the relative-position table stay float32.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from onnx import TensorProto

from edgegen.export.onnx_graph import Graph, WeightFile
from edgegen.export.quantize import Linears, Quant, dequantize
from edgegen.export.vision import placeholders_in_vocab
from edgegen.export.weights import Checkpoint, Weights
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.manifest import AUDIO_TOKEN_IDS, INPUT_FEATURES, SOFT_TOKENS

F32 = TensorProto.FLOAT
FEATURES, EMBEDDINGS = INPUT_FEATURES, SOFT_TOKENS
GRAPH = "audio"
TOWER, EMBEDDER = "model.audio_tower.", "model.embed_audio."
# The processor's placeholders per second, from its arithmetic: 10 ms mel hop, two stride-2 convolutions.
_SUBSAMPLING = 4


def has_audio_tower(ckpt: Checkpoint) -> bool:
    return f"{TOWER}output_proj.weight" in ckpt and f"{EMBEDDER}embedding_projection.weight" in ckpt


def exports_audio(pair) -> bool:
    """Whether the bundle gets an audio graph: the checkpoint has an audio tower (E2B, E4B)."""
    return (getattr(pair.config, "audio_config", None) is not None and has_audio_tower(pair.checkpoint)
            and placeholders_in_vocab(pair, "audio_token_id"))


def audio_quant(target: Quant) -> Quant:
    """fp32 with an fp32 target, else int8 weights with fp32 compute: the tower runs once per clip and its
    output conditions every later token, so it keeps the drafter's precision and PyTorch's arithmetic."""
    return target if target.kind == "fp32" else Quant("int8", target.block_size, 0)


def _context(cfg) -> tuple[int, int, int]:
    """(max past, max future, rows of the relative-position table) of the tower's local attention."""
    past, future = cfg.attention_context_left - 1, cfg.attention_context_right
    context = cfg.attention_chunk_size + past + future
    table = context // 2 + 1
    if past + future > table - 1:  # transformers' rel-shift would put zeros inside the window; not modelled
        raise EdgegenError(f"the audio tower's attention window ({past} back, {future} ahead, chunk "
                           f"{cfg.attention_chunk_size}) is not supported; please report this model")
    return past, future, table


def position_table(cfg) -> np.ndarray:
    """[P, hidden] sinusoidal embeddings of relative positions P-1 .. 0 ([sin | cos]), as transformers' float32."""
    _, _, table = _context(cfg)
    half = cfg.hidden_size // 2
    step = math.log(10000.0) / max(half - 1, 1)
    inv = np.exp(np.arange(half, dtype=np.float32) * np.float32(-step)).astype(np.float32)
    scaled = np.arange(table - 1, -1, -1, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=-1).astype(np.float32)


def _rounded(array: np.ndarray, quant: Quant) -> np.ndarray:
    """A weight the graph folds into a constant, with the rounding its MatMuls would give it."""
    return dequantize(array, quant.bits, quant.block_for(array.shape[1])) if quant.bits else array


class _Builder:
    def __init__(self, g: Graph, lin: Linears, cfg, quant: Quant):
        self.g, self.lin, self.cfg, self.quant = g, lin, cfg, quant
        self.clip = float(cfg.gradient_clipping)

    def f32(self, value) -> str:
        return self.g.const(np.asarray(value, np.float32), np.float32)

    def clamp(self, x: str, lo: float | None = None, hi: float | None = None) -> str:
        lo, hi = (-self.clip, self.clip) if lo is None else (lo, hi)
        if lo == -math.inf and hi == math.inf:
            return x
        return self.g.op("Clip", x, self.f32(max(lo, -3.4e38)), self.f32(min(hi, 3.4e38)))

    def rms(self, x: str, w: Weights, name: str, eps: float) -> str:
        # Gemma4RMSNorm: x * (mean(x^2) + eps)^-0.5 * weight, with Pow as in transformers
        g = self.g
        ms = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1]), keepdims=1)
        normed = g.op("Mul", x, g.op("Pow", g.op("Add", ms, self.f32(eps)), self.f32(-0.5)))
        return g.op("Mul", normed, g.weight(f"{w.prefix}{name}.weight", w.array(f"{name}.weight")))

    def linear(self, x: str, w: Weights, name: str) -> str:
        """Gemma4ClippableLinear: the checkpoint's input and output bounds around a bias-free linear."""
        clipped = self.cfg.use_clipped_linears and f"{name}.input_min" in w
        if clipped:
            x = self.clamp(x, *(float(w.array(f"{name}.input_{b}")) for b in ("min", "max")))
        y = self.lin(x, f"{w.prefix}{name}", w[f"{name}.linear.weight"])
        if clipped:
            y = self.clamp(y, *(float(w.array(f"{name}.output_{b}")) for b in ("min", "max")))
        return y

    def silu(self, x: str) -> str:
        return self.g.op("Mul", x, self.g.op("Sigmoid", x))

    # -- blocks -----------------------------------------------------------------------------------------
    def subsample(self, features: str, w: Weights) -> str:
        g, eps = self.g, self.cfg.rms_norm_eps
        x = g.op("Unsqueeze", features, g.const([1]))  # [1, 1, F, mel]
        for i in range(2):
            lw = w.sub(f"layer{i}")
            x = g.op("Conv", x, g.weight(f"{lw.prefix}conv.weight", lw.array("conv.weight")),
                     kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
            x = g.op("Transpose", x, perm=[0, 2, 3, 1])  # channels last for the norm
            x = g.op("LayerNormalization", x, g.weight(f"{lw.prefix}norm.weight", lw.array("norm.weight")),
                     axis=-1, epsilon=eps)
            x = g.op("Relu", x)
            if i == 0:
                x = g.op("Transpose", x, perm=[0, 3, 1, 2])
        # [1, T, mel/4, C] -> [1, T, mel/4 * C], the order transformers flattens in
        x = g.op("Reshape", x, g.const([1, -1, int(np.prod(w["input_proj_linear.weight"].shape[1:]))]))
        return self.lin(x, f"{w.prefix}input_proj_linear", w["input_proj_linear.weight"])

    def feed_forward(self, x: str, w: Weights) -> str:
        g = self.g
        h = self.rms(self.clamp(x), w, "pre_layer_norm", 1e-6)
        h = self.linear(self.silu(self.linear(h, w, "ffw_layer_1")), w, "ffw_layer_2")
        h = self.rms(self.clamp(h), w, "post_layer_norm", 1e-6)
        return g.op("Add", g.op("Mul", h, self.f32(self.cfg.residual_weight)), x)

    def attention(self, x: str, w: Weights, window: tuple[str, str]) -> str:
        g, cfg = self.g, self.cfg
        heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        per_dim = w.array("per_dim_scale").astype(np.float32)
        softplus = np.logaddexp(np.float32(0), per_dim).astype(np.float32)
        q = g.op("Reshape", self.linear(x, w, "q_proj"), g.const([1, -1, heads, d]))
        q = g.op("Mul", g.op("Mul", q, self.f32((d ** -0.5) / math.log(2))), g.weight(f"{w.prefix}softplus", softplus))
        k = g.op("Reshape", self.linear(x, w, "k_proj"), g.const([1, -1, heads, d]))
        k = g.op("Mul", k, self.f32(math.log(1 + math.e) / math.log(2)))
        v = g.op("Reshape", self.linear(x, w, "v_proj"), g.const([1, -1, heads, d]))
        q = g.op("Transpose", q, perm=[0, 2, 1, 3])  # [1, heads, N, d]
        scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 2, 3, 1]))
        # Relative term: queries against the projected position table [P, heads, d], then per (q, k) the
        # column of their distance (index, mask: from `window`).
        rel = position_table(cfg) @ _rounded(w.array("relative_k_proj.weight"), self.quant).T
        rel = np.ascontiguousarray(rel.reshape(-1, heads, d).transpose(1, 2, 0)[None], dtype=np.float32)
        by_distance = g.op("MatMul", q, g.weight(f"{w.prefix}relative_keys", rel))  # [1, heads, N, P]
        index, visible = window
        index = g.op("Expand", index, g.op("Shape", scores))
        scores = g.op("Add", scores, g.op("GatherElements", by_distance, index, axis=3))
        cap = self.f32(cfg.attention_logit_cap)
        scores = g.op("Mul", g.op("Tanh", g.op("Div", scores, cap)), cap)
        scores = g.op("Where", visible, scores, self.f32(cfg.attention_invalid_logits_value))
        out = g.op("MatMul", g.op("Softmax", scores, axis=-1), g.op("Transpose", v, perm=[0, 2, 1, 3]))
        out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([1, -1, heads * d]))
        return self.linear(out, w, "post")

    def light_conv(self, x: str, w: Weights) -> str:
        g, cfg = self.g, self.cfg
        h = self.linear(self.rms(x, w, "pre_layer_norm", cfg.rms_norm_eps), w, "linear_start")
        a, b = g.op("Split", h, axis=-1, num_outputs=2, out=2)
        h = g.op("Transpose", g.op("Mul", a, g.op("Sigmoid", b)), perm=[0, 2, 1])  # GLU, then [1, hidden, N]
        kernel = w.array("depthwise_conv1d.weight")  # [hidden, 1, K]: causal, K - 1 frames of left padding
        h = g.op("Conv", h, g.weight(f"{w.prefix}depthwise_conv1d.weight", kernel), group=kernel.shape[0],
                 kernel_shape=[kernel.shape[-1]], pads=[kernel.shape[-1] - 1, 0])
        h = self.clamp(g.op("Transpose", h, perm=[0, 2, 1]))
        h = self.linear(self.silu(self.rms(h, w, "conv_norm", cfg.rms_norm_eps)), w, "linear_end")
        return g.op("Add", h, x)

    def layer(self, x: str, w: Weights, window: tuple[str, str]) -> str:
        g = self.g
        x = self.feed_forward(x, w.sub("feed_forward1"))
        h = self.rms(self.clamp(x), w, "norm_pre_attn", 1e-6)
        h = self.rms(self.clamp(self.attention(h, w.sub("self_attn"), window)), w, "norm_post_attn", 1e-6)
        x = self.light_conv(g.op("Add", h, x), w.sub("lconv1d"))
        x = self.feed_forward(x, w.sub("feed_forward2"))
        return self.rms(self.clamp(x), w, "norm_out", 1e-6)

    def window(self, x: str) -> tuple[str, str]:
        """Per (query, key): the relative table's column for their distance, and whether the key is visible."""
        g = self.g
        past, future, table = _context(self.cfg)
        n = g.op("Gather", g.op("Shape", x), g.const(1), axis=0)
        r = g.op("Range", g.const(0), n, g.const(1))
        dist = g.op("Sub", g.op("Unsqueeze", r, g.const([1])), g.op("Unsqueeze", r, g.const([0])))  # q - k
        # transformers' window (sliding_window_mask_function with (left - 1, right)) is exclusive at both ends:
        # 0 <= q - k < left - 1, or 0 < k - q < right; its blocks hold one more key each side, always masked.
        visible = g.op("And", g.op("Less", dist, g.const(past)), g.op("Greater", dist, g.const(-max(future, 1))))
        # row of the table (positions table-1 .. 0) holding distance q - k: past - (q - k), see _context
        index = g.op("Clip", g.op("Sub", g.const(past), dist), g.const(0), g.const(table - 1))
        return index, visible


def build_audio_graph(ckpt: Checkpoint, audio_cfg, text_hidden: int, quant: Quant, out_dir: Path,
                      shared: WeightFile, profile) -> Graph:
    """The audio tower + embedder graph (inputs and outputs in the module docstring)."""
    g = Graph(GRAPH, out_dir, shared, profile=profile)
    lin = Linears(g, quant)
    b = _Builder(g, lin, audio_cfg, quant)
    tower, embedder = Weights(ckpt, TOWER), Weights(ckpt, EMBEDDER)
    mel = int(audio_cfg.subsampling_conv_channels[0])  # transformers sizes the projection by it: mel bins
    features = g.input(FEATURES, F32, [1, "frames", mel])
    x = b.subsample(features, tower.sub("subsample_conv_projection"))
    window = b.window(x)
    for i in range(audio_cfg.num_hidden_layers):
        x = b.layer(x, tower.sub(f"layers.{i}"), window)
    x = g.op("Add", lin(x, f"{TOWER}output_proj", tower["output_proj.weight"]),
             g.weight(f"{TOWER}output_proj.bias", tower.array("output_proj.bias")))
    ms = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1]), keepdims=1)
    x = g.op("Mul", x, g.op("Pow", g.op("Add", ms, b.f32(audio_cfg.rms_norm_eps)), b.f32(-0.5)))
    x = lin(x, f"{EMBEDDER}embedding_projection", embedder["embedding_projection.weight"])
    g.output(g.op("Squeeze", x, g.const([0])), EMBEDDINGS, F32, ["tokens", text_hidden])
    return g


def audio_settings(target_dir: Path, config) -> dict:
    """The manifest's `audio` section: the feature extractor and processor settings the runtime needs (from
    the checkpoint's processor files, else transformers' defaults), the media token ids (from the config)."""
    import json

    audio_cfg = config.audio_config

    fe = {"feature_size": 128, "sampling_rate": 16000, "frame_length_ms": 20.0, "hop_length_ms": 10.0,
          "min_frequency": 0.0, "max_frequency": 8000.0, "preemphasis": 0.0, "preemphasis_htk_flavor": True,
          "fft_overdrive": False, "dither": 0.0, "input_scale_factor": 1.0, "mel_floor": 1e-3,
          "per_bin_mean": None, "per_bin_stddev": None, "max_length": 480000}
    proc = {"audio_seq_length": 750, "audio_ms_per_token": 40}
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = Path(target_dir) / name
        if not path.is_file():
            continue
        raw = json.loads(path.read_text())
        section = raw.get("feature_extractor", raw if raw.get("feature_extractor_type") else {})
        fe.update({k: section[k] for k in fe if k in section})
        proc.update({k: raw[k] for k in proc if k in raw})
    if fe["dither"]:
        raise EdgegenError("the checkpoint's audio feature extractor adds random dither; edgegen computes "
                           "features deterministically, so set dither to 0.0 in its processor config")
    if fe["feature_size"] != int(audio_cfg.subsampling_conv_channels[0]):
        raise EdgegenError(f"the audio feature extractor makes {fe['feature_size']} mel bins but the audio tower "
                           f"reads {audio_cfg.subsampling_conv_channels[0]}; is the processor config from this model?")
    ids = {"audio_token_id": config.audio_token_id, "boa_token_id": config.boa_token_id,
           "eoa_token_id": getattr(config, "eoa_token_id", None) or config.eoa_token_index}
    if any(v is None for v in ids.values()):
        raise EdgegenError("the checkpoint's config names no audio token ids (audio_token_id, boa_token_id, "
                           "eoa_token_index); is it a Gemma 4 multimodal checkpoint?")
    assert tuple(ids) == AUDIO_TOKEN_IDS
    return {"graph": GRAPH, "feature_extractor": fe, **proc, **{k: int(v) for k, v in ids.items()},
            "tokens_per_second": 1000.0 / (fe["hop_length_ms"] * _SUBSAMPLING)}


def write_audio_graph(pair, quant: Quant, tmp: Path, profile) -> dict:
    """Build and save `audio.onnx` (+ its weights) into the bundle directory `tmp`; returns the manifest's
    `audio` section."""
    cfg = pair.config
    shared = WeightFile(tmp / f"{GRAPH}.shared.unused")  # the tower shares no weight with the text graphs
    g = build_audio_graph(pair.checkpoint, cfg.audio_config, cfg.get_text_config().hidden_size, quant, tmp, shared,
                          profile)
    g.save(tmp)
    g.data.close()
    shared.close()
    (tmp / f"{GRAPH}.shared.unused").unlink()
    return audio_settings(pair.target_dir, cfg)


# -- verification against PyTorch ------------------------------------------------------------------------


def pytorch_tower(ckpt: Checkpoint, config, quant: Quant | None = None):
    """transformers' Gemma4AudioModel + audio embedder with the checkpoint's weights (float32), rounded
    like the graph's MatMuls when `quant` is quantized."""
    import torch
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel, Gemma4MultimodalEmbedder

    from edgegen.export.verify import round_in_place

    tower = Gemma4AudioModel(config.audio_config).eval()
    embedder = Gemma4MultimodalEmbedder(config.audio_config, config.get_text_config()).eval()
    for module, prefix in ((tower, TOWER), (embedder, EMBEDDER)):
        state = {k: torch.from_numpy(np.array(ckpt.get(prefix + k)))
                 for k in module.state_dict() if prefix + k in ckpt}
        missing = set(module.state_dict()) - set(state)
        module.load_state_dict(state, strict=False)
        if missing - {k for k, _ in module.named_buffers() if k not in dict(module.named_parameters())}:
            raise EdgegenError(f"the checkpoint has no audio tensors {sorted(missing)[:3]}; is it complete?")
    if quant is not None and quant.bits:
        round_in_place(tower, quant)
        round_in_place(embedder, quant)
    return tower, embedder


def pytorch_embeddings(tower, embedder, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The valid soft-token embeddings of one (padded) clip, as Gemma4Model.get_audio_features gives them."""
    import torch

    with torch.no_grad():
        out = tower(torch.from_numpy(features[None]), torch.from_numpy(mask[None]), return_dict=True)
        emb = embedder(out.last_hidden_state)
    return emb[out.attention_mask].numpy()


def verify_audio(ckpt: Checkpoint, config, bundle_dir: Path, quant: Quant, settings: dict,
                 seconds=(0.37, 1.3)) -> dict:
    """The bundle's audio graph against PyTorch (weights rounded as the graph's) on random clips, features
    padded as the processor pads them, so the check covers the padding argument in the module docstring.
    `settings`: the manifest's audio section. Returns the parity checks."""
    import onnxruntime as ort

    from edgegen.runtime import audio as raudio

    extractor = raudio.LogMel(settings["feature_extractor"])
    tower, embedder = pytorch_tower(ckpt, config, quant)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(Path(bundle_dir) / f"{GRAPH}.onnx"), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for s in seconds:
        wave = (0.3 * rng.standard_normal(int(s * extractor.sampling_rate))).astype(np.float32)
        feats = extractor(wave)
        got = sess.run([EMBEDDINGS], {FEATURES: feats[None]})[0]
        pad = np.zeros((8, feats.shape[1]), np.float32)  # padded frames, masked as transformers masks them
        mask = np.r_[np.ones(len(feats), bool), np.zeros(len(pad), bool)]
        ref = pytorch_embeddings(tower, embedder, np.concatenate([feats, pad]), mask)
        if ref.shape != got.shape:
            raise EdgegenError(f"the audio graph made {got.shape[0]} tokens where PyTorch makes {ref.shape[0]}; "
                               "please report this model")
        worst = max(worst, float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max()))))
    tolerance = 1e-4  # relative to the largest embedding value; like with like, so fp32 and int8 alike
    return {"audio_soft_tokens": {"value": worst, "tolerance": tolerance, "passed": worst <= tolerance}}

"""The bundle contract: `manifest.json`, written by `edgegen export`, read by the runtime.

This module is the single place that names every tensor the runtime feeds or reads.

target graph (prefill, verify and decode; S new tokens, the cache holds `past` positions):
  in   input_ids [1,S] int64 · position_ids [1,S] int64 = past..past+S-1 · logits_to_keep [] int64 (N)
       (webgpu profile: logits_start [1] int64 = -N instead)
       per_layer_inputs [1,S,L,P] float32 = rows of the PLE table for input_ids (if model.ple)
       seqlens_k [1] int32 = past+S-1 · total_sequence_length [] int32 = past+S
       past_key.{i} / past_value.{i} [1,kv_heads,length,head_dim] for every KV buffer i (KVBuffer: length
       max_context, or a ring of R slots holding position p at slot p mod R; dtype float32 or float16)
       multimodal checkpoints (cpu profile) also: soft_rows [M,1] int64 · soft_embeds [M,H] float32: rows
       (0..S-1) of this call whose embedding is soft_embeds instead of the token's (images, audio; M may be 0);
       their input_ids are the pad id, as transformers' Gemma4Model sets them (the PLE rows are pad's)
  out  logits [1,N,V] (softcapped) · last_hidden [1,N,H] (post-norm) for the last N positions
       present_key.{j} / present_value.{j}: written in place; bind each to the buffer `kv_aliases` names
vision graph (one image; manifest `vision` holds the processor settings; runtime/vision.py):
  in   pixel_values [1,N,3*p*p] float32 (patches in [0,1]) · pixel_positions [1,N,2] int64 (x, y of each patch)
       pooling [1,T,N] float32 (average-pooling weights: patch n to soft token t)
  out  soft_tokens [T,H] float32: the image's soft tokens in the text model's space (feed as soft_embeds)
audio graph (one clip; manifest `audio` holds the feature extractor settings and token ids; runtime/audio.py):
  in   input_features [1,F,M] float32 (log-mel frames of the clip, valid frames only)
  out  soft_tokens [T,H] float32, T = ceil(ceil(F/2)/2): the clip's soft tokens (feed as soft_embeds)
assistant graph (one draft step; the cache holds P accepted, processed positions):
  in   token [1,1] int64 (last token) · hidden [1,1,H] (target last hidden, or previous projected_hidden)
       position_ids [1,1] int64 = P (constant over a draft burst) · seqlens_k [1] int32 = P-1
       total_sequence_length [] int32 = P · past_key.{s} / past_value.{s} for the store buffers
  out  logits [1,1,V] · next_token [1,1] int64 (argmax) · projected_hidden [1,1,H]
       present_key.{j} / present_value.{j} aliases of the store buffers (rewritten unchanged)
ep_profile "qnn": static-shape graphs from standard ops (export/graphs.py, static_shapes), fed by runtime/qnn.py
  (host-side RoPE rows, masks and K/V row writes). M = max_context, S = query rows, T = M + S:
  target     in  input_ids [1,S] int64 · per_layer_inputs [1,S,L,P] · rope_cos.{kind} / rope_sin.{kind}
                 [1,S,1,d_kind] · attention_mask.{kind} [1,1,S,T] · past_key.{i} / past_value.{i} [1,kvh,M,d]
             out logits [1,S,V] (softcapped) · last_hidden [1,S,H] · new_key.{i} / new_value.{i} [1,kvh,S,d]
  assistant  in  token [1,1] int64 · hidden [1,1,H] · rope_cos/sin.{kind} [1,1,1,d] ·
                 attention_mask.{kind} [1,1,1,M] · past_key.{s} / past_value.{s} (store layers)
             out logits [1,1,V] · projected_hidden [1,1,H]
  The QDQ export moves the boundary Quantize/DequantizeLinear to the host: tensors listed in
  static.quantized_io are fed and returned as integers (e.g. uint16) with the scale and zero point given there.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgegen.runtime.errors import EdgegenError

# -- tensor names ------------------------------------------------------------------------------------------
# Every graph input and output, named once: export/graphs.py builds the graphs with these names (and dtypes)
# and the runtime feeds and reads them by the same constants and helpers; nothing else spells a tensor name.
INPUT_IDS, POSITION_IDS, PER_LAYER_INPUTS = "input_ids", "position_ids", "per_layer_inputs"
LOGITS_TO_KEEP, LOGITS_START = "logits_to_keep", "logits_start"
SEQLENS_K, TOTAL_SEQUENCE_LENGTH = "seqlens_k", "total_sequence_length"
LOGITS, LAST_HIDDEN = "logits", "last_hidden"
TOKEN, HIDDEN, PROJECTED_HIDDEN, NEXT_TOKEN = "token", "hidden", "projected_hidden", "next_token"
TOKENS, INV_TEMPERATURE, GUMBEL = "tokens", "inv_temperature", "gumbel"  # draft_round
SOFT_ROWS, SOFT_EMBEDS = "soft_rows", "soft_embeds"  # target of a multimodal checkpoint: embeddings at placeholders
PIXEL_VALUES, PIXEL_POSITIONS, POOLING, SOFT_TOKENS = "pixel_values", "pixel_positions", "pooling", "soft_tokens"
INPUT_FEATURES = "input_features"  # audio graph
# The dtype of each of them (K/V buffers: KVBuffer.dtype; qnn's quantized IO: the manifest's static section).
DTYPES = {INPUT_IDS: "int64", POSITION_IDS: "int64", PER_LAYER_INPUTS: "float32", LOGITS_TO_KEEP: "int64",
          LOGITS_START: "int64", SEQLENS_K: "int32", TOTAL_SEQUENCE_LENGTH: "int32", LOGITS: "float32",
          LAST_HIDDEN: "float32", TOKEN: "int64", HIDDEN: "float32", PROJECTED_HIDDEN: "float32",
          NEXT_TOKEN: "int64", TOKENS: "int64", INV_TEMPERATURE: "float32", GUMBEL: "float32",
          SOFT_ROWS: "int64", SOFT_EMBEDS: "float32", PIXEL_VALUES: "float32", PIXEL_POSITIONS: "int64",
          POOLING: "float32", SOFT_TOKENS: "float32", INPUT_FEATURES: "float32"}
_PAST, _PRESENT, _NEW = ("past_key", "past_value"), ("present_key", "present_value"), ("new_key", "new_value")
_ROPE, _MASK = ("rope_cos", "rope_sin"), "attention_mask"


def past_kv(layer: int) -> tuple[str, str]:
    """The K and V buffer inputs of store layer `layer` (KVBuffer.name is the K one)."""
    return f"{_PAST[0]}.{layer}", f"{_PAST[1]}.{layer}"


def draft_step(i: int) -> str:
    """The suffix of draft_round's per-step outputs (step i of k)."""
    return f".s{i}"


def present_kv(layer: int, step: str = "") -> tuple[str, str]:
    """The K and V outputs layer `layer` writes in place; step: draft_step(i) in draft_round, else ""."""
    return f"{_PRESENT[0]}.{layer}{step}", f"{_PRESENT[1]}.{layer}{step}"


def new_kv(layer: int) -> tuple[str, str]:
    """The qnn profile's outputs of the new K and V rows of store layer `layer`, which the host writes."""
    return f"{_NEW[0]}.{layer}", f"{_NEW[1]}.{layer}"


def value_buffer(key_buffer: str) -> str:
    """past_key.{i} -> past_value.{i}."""
    return key_buffer.replace(_PAST[0], _PAST[1], 1)


def is_buffer(name: str) -> bool:
    return name.split(".", 1)[0] in _PAST


def buffer_of(new_rows: str) -> str | None:
    """The buffer a new-rows output is written into (new_value.{i} -> past_value.{i}); None for other names."""
    head, _, layer = new_rows.partition(".")
    return f"{_PAST[_NEW.index(head)]}.{layer}" if head in _NEW else None


def rope_inputs(kind: str) -> tuple[str, str]:
    """The qnn profile's host-fed RoPE cos and sin rows of a layer kind."""
    return f"{_ROPE[0]}.{kind}", f"{_ROPE[1]}.{kind}"


def mask_input(kind: str) -> str:
    """The qnn profile's host-fed additive attention mask of a layer kind."""
    return f"{_MASK}.{kind}"


def mask_kind(name: str) -> str | None:
    """The layer kind of a mask input's name, else None."""
    head, _, kind = name.partition(".")
    return kind if head == _MASK else None


SCHEMA_VERSION = 2
# Version 1 bundles had no KVBuffer length/dtype: every buffer was max_context rows of float32, which is what
# the defaults say, so they still load.
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list


@dataclass
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kv_aliases: dict[str, str]  # present output -> buffer (past input) it is bound to
    quantization: dict

    @classmethod
    def from_dict(cls, d: dict) -> GraphSpec:
        return cls(
            file=d["file"],
            inputs=[TensorSpec(**t) for t in d["inputs"]],
            outputs=[TensorSpec(**t) for t in d["outputs"]],
            kv_aliases=dict(d["kv_aliases"]),
            quantization=dict(d.get("quantization", {})),
        )


@dataclass
class KVBuffer:
    name: str  # e.g. past_key.3
    layer: int
    kind: str  # sliding_attention | full_attention
    kv_heads: int
    head_dim: int
    # Rows: "max_context" (position p at row p), or R, a ring (sliding layers: position p at slot p mod R;
    # the attention masks slots by the position they hold, runtime/kv.py limits the rows a call may write).
    length: int | str = "max_context"
    dtype: str = "float32"  # or float16 (--kv-dtype fp16: stored half, attended in float32)


@dataclass
class PLESpec:
    file: str  # .npy, [vocab, layers*dim]: float32 rows, or uint8 codes with `scales_file`
    num_layers: int
    dim: int
    bits: int = 0  # 0: float32; 8 or 4: block-quantized codes
    block_size: int = 0
    scales_file: str | None = None


@dataclass
class ModelSpec:
    vocab_size: int
    hidden_size: int
    layer_types: list[str]
    sliding_window: int
    max_context: int
    store_layers: dict[str, int]
    kv_buffers: list[KVBuffer]
    final_logit_softcapping: float | None
    ple: PLESpec | None


@dataclass
class Manifest:
    schema_version: int
    model: ModelSpec
    graphs: dict[str, GraphSpec]
    tokenizer: dict  # {"files": [...], "chat_template": file or None}
    generation: dict  # eos_token_ids, bos_token_id, pad_token_id, draft_tokens
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"bytes", "sha256"}
    parity: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    edgegen_version: str = ""
    ep_profile: str = "cpu"  # the execution provider the graphs were exported for (cpu, qnn, webgpu, openvino)
    static: dict = field(default_factory=dict)  # static-shape profiles: RoPE frequencies, mask value, EP binaries
    export: dict = field(default_factory=dict)  # how the export went: {"seconds", "peak_rss_mb"} (informational)
    # The vision graph's image processor settings and media token ids (runtime/vision.py), {} without one.
    vision: dict = field(default_factory=dict)
    # The audio graph's feature extractor settings and media token ids (runtime/audio.py), {} without one.
    audio: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        m = d["model"]
        ple = m.get("ple")
        model = ModelSpec(
            vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], layer_types=list(m["layer_types"]),
            sliding_window=m["sliding_window"], max_context=m["max_context"],
            store_layers=dict(m["store_layers"]), kv_buffers=[KVBuffer(**b) for b in m["kv_buffers"]],
            final_logit_softcapping=m.get("final_logit_softcapping"),
            ple=PLESpec(**ple) if ple else None,
        )
        return cls(
            schema_version=d["schema_version"], model=model,
            graphs={k: GraphSpec.from_dict(v) for k, v in d["graphs"].items()},
            tokenizer=dict(d["tokenizer"]), generation=dict(d["generation"]), files=dict(d.get("files", {})),
            parity=dict(d.get("parity", {})), source=dict(d.get("source", {})),
            edgegen_version=d.get("edgegen_version", ""), ep_profile=str(d.get("ep_profile", "cpu")),
            static=dict(d.get("static", {})),
            export=dict(d.get("export", {})),
            vision=dict(d.get("vision", {})),
            audio=dict(d.get("audio", {})),
        )


def load_manifest(bundle: str | Path) -> Manifest:
    """Read and validate `<bundle>/manifest.json`; every failure is one EdgegenError line."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.exists():
        raise EdgegenError(f"bundle '{bundle}' does not exist; create one with `edgegen export`")
    if not bundle.is_dir():
        raise EdgegenError(f"bundle '{bundle}' is not a directory; pass the directory `edgegen export` wrote")
    if not path.is_file():
        raise EdgegenError(f"'{bundle}' has no {MANIFEST}; is it an edgegen bundle?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise EdgegenError(f"{path} is not valid JSON; re-export the bundle") from None
    if not isinstance(raw, dict):
        raise EdgegenError(f"{path} is not an edgegen manifest; re-export the bundle")
    version = raw.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise EdgegenError(
            f"bundle schema version {version!r} is not supported (this edgegen reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}); re-export it with this edgegen"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        detail = " ".join(str(exc).split())  # a damaged key may hold a newline: the message stays one line
        raise EdgegenError(f"{path} is missing or has a malformed field ({detail}); re-export the bundle") from None
    if "target" not in manifest.graphs:
        raise EdgegenError(f"{path} lists no target graph; re-export the bundle")
    problem = _first_problem(manifest)
    if problem:
        raise EdgegenError(f"{path} has a malformed field ({problem}); re-export the bundle")
    return manifest


# -- field checks: a manifest from an untrusted source must not be able to crash the loader ---------------

LAYER_KINDS = ("sliding_attention", "full_attention")
KV_DTYPES = ("float32", "float16")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BUFFER = re.compile(rf"{_PAST[0]}\.\d+")


def _int(x: object, lo: int, hi: int = 1 << 40) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _str(x: object) -> bool:
    return isinstance(x, str) and bool(x)


def _first_problem(m: Manifest) -> str | None:
    """The first field that has the wrong type or an impossible value, or None. Checks run in order and
    later ones rely on earlier ones (hence lambdas). Paths are checked against the bundle by integrity.py."""
    model = m.model
    files, template = m.tokenizer.get("files", []), m.tokenizer.get("chat_template")
    eos, draft = m.generation.get("eos_token_ids") or [], m.generation.get("draft_tokens")
    checks = [
        ("model.vocab_size", lambda: _int(model.vocab_size, 1, 1 << 24)),
        ("model.hidden_size", lambda: _int(model.hidden_size, 1, 1 << 20)),
        ("model.layer_types", lambda: isinstance(model.layer_types, list) and 0 < len(model.layer_types) <= 4096
         and all(k in LAYER_KINDS for k in model.layer_types)),
        ("model.sliding_window", lambda: _int(model.sliding_window, 1)),
        ("model.max_context", lambda: _int(model.max_context, 2, 1 << 24)),
        ("model.store_layers", lambda: all(isinstance(k, str) and _int(v, 0, len(model.layer_types) - 1)
                                           for k, v in model.store_layers.items())),
        ("model.kv_buffers", lambda: 0 < len(model.kv_buffers) <= len(model.layer_types) and all(
            isinstance(b.name, str) and _BUFFER.fullmatch(b.name) and _int(b.layer, 0) and b.kind in LAYER_KINDS
            and _int(b.kv_heads, 1, 1 << 12) and _int(b.head_dim, 1, 1 << 14)
            and (b.length == "max_context" or _int(b.length, 1, model.max_context)) and b.dtype in KV_DTYPES
            for b in model.kv_buffers)),
        ("model.final_logit_softcapping", lambda: model.final_logit_softcapping is None or (
            isinstance(model.final_logit_softcapping, (int, float))
            and not isinstance(model.final_logit_softcapping, bool))),
        ("model.ple", lambda: model.ple is None or _ple_ok(model.ple)),
        ("graphs", lambda: all(isinstance(k, str) and _graph_ok(g) for k, g in m.graphs.items())),
        ("graphs.kv_aliases", lambda: all(buf in _buffer_names(model) for g in m.graphs.values()
                                          for buf in g.kv_aliases.values())),
        ("graphs.draft_round.outputs", lambda: "draft_round" not in m.graphs or _round_ok(m.graphs["draft_round"])),
        ("tokenizer.files", lambda: isinstance(files, list) and all(_str(f) for f in files)),
        ("tokenizer.chat_template", lambda: template is None or _str(template)),
        ("generation.eos_token_ids", lambda: isinstance(eos, list) and all(_int(t, 0, model.vocab_size - 1)
                                                                           for t in eos)),
        ("generation.draft_tokens", lambda: draft is None or _int(draft, 0, 64)),
        ("vision", lambda: not m.vision or ("vision" in m.graphs and _vision_ok(m.vision, model.vocab_size))),
        ("audio", lambda: not m.audio or ("audio" in m.graphs and _audio_ok(m.audio, model.vocab_size))),
        ("export", lambda: all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                               for k, v in m.export.items())),
        ("files", lambda: all(isinstance(k, str) and isinstance(v, dict) and _int(v.get("bytes"), 0, 1 << 50)
                              and isinstance(v.get("sha256"), str) and _SHA256.fullmatch(v["sha256"])
                              for k, v in m.files.items())),
    ]
    return next((name for name, ok in checks if not ok()), None)


VISION_INTS = ("patch_size", "pooling_kernel_size", "max_soft_tokens", "image_token_id", "boi_token_id",
               "eoi_token_id", "pad_token_id")


def _vision_ok(v: dict, vocab: int) -> bool:
    """The image processor settings runtime/vision.py reads (export/vision.py writes them)."""
    ints = all(_int(v.get(k), 0, 1 << 24) for k in VISION_INTS)
    return (ints and all(_int(v[k], 0, vocab - 1) for k in VISION_INTS if k.endswith("token_id"))
            and v["patch_size"] > 0 and v["pooling_kernel_size"] > 0 and v["max_soft_tokens"] > 0
            and isinstance(v.get("rescale_factor"), (int, float)) and isinstance(v.get("do_normalize"), bool)
            and all(isinstance(v.get(k), list) and len(v[k]) == 3 and all(isinstance(x, (int, float)) for x in v[k])
                    for k in ("image_mean", "image_std"))
            and v.get("resample") in ("bicubic", "bilinear", "nearest", "lanczos"))


AUDIO_TOKEN_IDS = ("audio_token_id", "boa_token_id", "eoa_token_id")
AUDIO_NUMBERS = ("sampling_rate", "feature_size", "frame_length_ms", "hop_length_ms", "min_frequency", "max_frequency",
                 "preemphasis", "input_scale_factor", "mel_floor", "max_length")


def _audio_ok(a: dict, vocab: int) -> bool:
    """The feature extractor settings and token ids runtime/audio.py reads (export/audio.py writes them)."""
    fe = a.get("feature_extractor")
    if not isinstance(fe, dict) or not all(_int(a.get(k), 0, vocab - 1) for k in AUDIO_TOKEN_IDS):
        return False
    numbers = all(isinstance(fe.get(k), (int, float)) and not isinstance(fe.get(k), bool) for k in AUDIO_NUMBERS)
    return (numbers and _int(fe["sampling_rate"], 1000, 1 << 20) and _int(fe["feature_size"], 1, 4096)
            and 0 < fe["hop_length_ms"] <= 1000 and 0 < fe["frame_length_ms"] <= 1000 and _int(fe["max_length"], 1)
            and all(isinstance(fe.get(k), bool) for k in ("preemphasis_htk_flavor", "fft_overdrive"))
            and all(fe.get(k) is None or (isinstance(fe[k], list) and len(fe[k]) == fe["feature_size"])
                    for k in ("per_bin_mean", "per_bin_stddev")))


def _ple_ok(ple: PLESpec) -> bool:
    quantized_ok = ple.bits == 0 or (ple.block_size > 0 and ple.scales_file is not None)
    return (_str(ple.file) and _int(ple.num_layers, 1, 4096) and _int(ple.dim, 1, 1 << 16) and ple.bits in (0, 4, 8)
            and _int(ple.block_size, 0, 1 << 20) and (ple.scales_file is None or _str(ple.scales_file))
            and quantized_ok)


def _buffer_names(model: ModelSpec) -> set[str]:
    return {n for b in model.kv_buffers for n in (b.name, value_buffer(b.name))}


def _round_ok(g: GraphSpec) -> bool:
    """The fused draft round's step count and vocabulary are read from its `tokens` and `logits` shapes."""
    shapes = {t.name: t.shape for t in g.outputs}
    return all(len(shapes.get(n, [])) == 2 and _int(shapes[n][1], 1) for n in (TOKENS, LOGITS))


def _graph_ok(g: GraphSpec) -> bool:
    tensors_ok = all(_str(t.name) and isinstance(t.dtype, str) and isinstance(t.shape, list)
                     and all(_int(d, 0) or isinstance(d, str) for d in t.shape) for t in g.inputs + g.outputs)
    return _str(g.file) and tensors_ok and all(_str(k) and _str(v) for k, v in g.kv_aliases.items())

"""The bundle contract: `manifest.json`, written by `edgegen export`, read by the runtime.

This module is the single place that names every tensor the runtime feeds or reads.

target graph (prefill, verify and decode; S new tokens, the cache holds `past` positions):
  in   input_ids [1,S] int64 · position_ids [1,S] int64 = past..past+S-1 · logits_to_keep [] int64 (N)
       (webgpu profile: logits_start [1] int64 = -N instead)
       per_layer_inputs [1,S,L,P] float32 = rows of the PLE table for input_ids (if model.ple)
       seqlens_k [1] int32 = past+S-1 · total_sequence_length [] int32 = past+S
       past_key.{i} / past_value.{i} [1,kv_heads,max_context,head_dim] float32 for every KV buffer i
  out  logits [1,N,V] (softcapped) · last_hidden [1,N,H] (post-norm) for the last N positions
       present_key.{j} / present_value.{j}: written in place; bind each to the buffer `kv_aliases` names
assistant graph (one draft step; the cache holds P accepted, processed positions):
  in   token [1,1] int64 (last token) · hidden [1,1,H] (target last hidden, or previous projected_hidden)
       position_ids [1,1] int64 = P (constant over a draft burst) · seqlens_k [1] int32 = P-1
       total_sequence_length [] int32 = P · past_key.{s} / past_value.{s} for the store buffers
  out  logits [1,1,V] · next_token [1,1] int64 (argmax) · projected_hidden [1,1,H]
       present_key.{j} / present_value.{j} aliases of the store buffers (rewritten unchanged)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgegen.runtime.errors import EdgegenError

SCHEMA_VERSION = 1
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
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EdgegenError(f"{path} is not valid JSON; re-export the bundle") from None
    if not isinstance(raw, dict):
        raise EdgegenError(f"{path} is not an edgegen manifest; re-export the bundle")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EdgegenError(
            f"bundle schema version {version!r} is not supported (this edgegen reads {SCHEMA_VERSION}); "
            "re-export it with this edgegen"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EdgegenError(f"{path} is missing or has a malformed field ({exc}); re-export the bundle") from None
    if "target" not in manifest.graphs:
        raise EdgegenError(f"{path} lists no target graph; re-export the bundle")
    return manifest

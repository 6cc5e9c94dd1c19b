"""The PyTorch oracle for a target of any size: transformers' own Gemma 4 text model, run one decoder layer
at a time with that layer's weights read from the checkpoint.

The model is built on the meta device (no memory). Token embeddings and per-layer embeddings are gathered
for the prompt's tokens only; each decoder layer gets its float32 weights (optionally with the bundle's
rounding) just before it runs and drops them after; the tied lm_head is applied by row blocks. Every call
of every sequence passes through a layer before the next layer is read, so the checkpoint is read once per
`run`. The per-layer computation, masks, RoPE and KV sharing are transformers' own code: the loop below
is `Gemma4TextModel.forward` in layer-major order, and tests/test_streaming_export.py holds it to the
ordinary whole-model forward on small presets.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from edgegen.export.loading import eager_experts
from edgegen.export.moe import expert_quant
from edgegen.export.quantize import Quant, dequantize
from edgegen.export.weights import Tensor, Weights

LM_HEAD_ROWS = 16384  # rows of the tied embedding per lm_head block (~100 MB of float32 at E2B width)


@dataclass
class Output:
    """What one call (one chunk of a sequence) produced."""

    logits: np.ndarray  # [keep, V], softcapped, for the call's last `keep` positions
    hidden: np.ndarray  # [S, H] post-norm last hidden states
    shared_kv: dict[str, tuple[np.ndarray, np.ndarray]]  # kind -> store layer K, V [1, kv, T, d]


def rounding_for(quant: Quant) -> Callable[..., np.ndarray] | None:
    """The weight rounding of a quantized graph (None for fp32): what MatMulNBits effectively multiplies by."""
    if not quant.bits:
        return None
    experts = expert_quant(quant)

    def rounded(w: np.ndarray, expert: bool = False) -> np.ndarray:
        q = experts if expert else quant  # an expert's matrix: the experts' blocks (export/moe.py)
        return dequantize(w, q.bits, q.block_for(w.shape[-1]))

    return rounded


class StreamedTarget:
    """`run` computes what `Gemma4ForCausalLM` computes for token sequences, reading the weights layer by layer.

    `round_linear`: applied to every Linear and embedding weight (None: the checkpoint's values in fp32).
    `ple_scale_rounding`: the PLE table is rounded with its scale folded in, as the bundle stores it.
    """

    def __init__(self, weights: Weights, cfg, lm_head: Tensor | None = None,
                 round_linear: Callable[..., np.ndarray] | None = None):
        from transformers import Gemma4TextModel
        from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

        self.w, self.cfg, self.round = weights, cfg, round_linear
        self.lm_head = lm_head if lm_head is not None else weights["embed_tokens.weight"]
        with torch.device("meta"):
            self.model = eager_experts(Gemma4TextModel(cfg).eval())
        m = self.model
        m.rotary_emb = Gemma4TextRotaryEmbedding(cfg)  # its buffers are computed, not stored: build them for real
        for emb in self._embeddings():
            emb.embed_scale = torch.tensor(emb.scalar_embed_scale)
        top = [m.norm] + ([m.per_layer_model_projection, m.per_layer_projection_norm]
                          if cfg.hidden_size_per_layer_input else [])
        for module in top:
            self._load(module, self._name_of(module))

    # -- weights ----------------------------------------------------------------------------------------
    def _name_of(self, module: torch.nn.Module) -> str:
        return next(name for name, mod in self.model.named_modules() if mod is module)

    def _embeddings(self) -> list:
        m = self.model
        return [m.embed_tokens] + ([m.embed_tokens_per_layer] if self.cfg.hidden_size_per_layer_input else [])

    def _array(self, full: str, linear: bool) -> np.ndarray:
        a = self.w.array(full)
        if not (linear and self.round):
            return a
        if a.ndim == 3:  # stacked experts [E, N, K]: the graph rounds each expert's matrix (export/moe.py)
            return np.stack([self.round(e, expert=True) for e in a])
        return self.round(a)

    def _load(self, module: torch.nn.Module, prefix: str) -> None:
        # Rounded like the graph's weights: Linears and experts; the router stays fp32 (export/moe.py).
        linear = {f"{n}.weight" if n else "weight" for n, mod in module.named_modules()
                  if isinstance(mod, torch.nn.Linear) and not n.endswith("router.proj")}
        linear |= {n for n in module.state_dict() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
        state = {name: torch.from_numpy(np.ascontiguousarray(self._array(f"{prefix}.{name}", name in linear)))
                 for name in module.state_dict()}
        module.load_state_dict(state, assign=True)

    def rows(self, table: str, ids: np.ndarray, scale: float | None = None) -> torch.Tensor:
        """Rows of an embedding table with the reference's rounding (the PLE table's with its scale folded)."""
        rows = self.w.ckpt.gather(self.w.prefix + table, ids)
        if self.round is not None:
            if scale is None:
                rows = self.round(rows)
            else:
                s = np.float32(scale)
                rows = self.round(rows * s) / s
        return torch.from_numpy(rows)

    def embed(self, ids: list[int]) -> torch.Tensor:
        """embed_tokens(ids) [1, S, H] (scale applied), by transformers' own module on the gathered rows."""
        return self._gathered(self.model.embed_tokens, "embed_tokens.weight", ids)

    def _gathered(self, module, table: str, ids: list[int], scale: float | None = None) -> torch.Tensor:
        unique, inverse = np.unique(np.asarray(ids, np.int64), return_inverse=True)
        module.weight = torch.nn.Parameter(self.rows(table, unique, scale), requires_grad=False)
        try:
            with torch.no_grad():
                return module(torch.from_numpy(inverse.reshape(1, -1)))
        finally:
            module.weight = torch.nn.Parameter(torch.empty(module.weight.shape, device="meta"), requires_grad=False)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head (by row blocks) and the final softcapping, as Gemma4ForCausalLM applies them."""
        n = self.lm_head.shape[0]
        parts = []
        for start in range(0, n, LM_HEAD_ROWS):
            block = self.lm_head[start : start + LM_HEAD_ROWS]
            if self.round is not None:
                block = self.round(block)
            parts.append(torch.nn.functional.linear(hidden, torch.from_numpy(block).to(hidden.dtype)))
        logits = torch.cat(parts, dim=-1)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = logits / cap
            logits = torch.tanh(logits)
            logits = logits * cap
        return logits

    # -- the forward ------------------------------------------------------------------------------------
    def run(self, sequences: list[list[list[int]]], keep: list[list[int]],
            float64: list[bool] | None = None) -> list[list[Output]]:
        """`sequences[s]`: the calls of one sequence (token ids), run in order with a KV cache (a single call
        runs without one, like a plain forward); `keep[s][c]`: how many final logits call c returns.
        `float64[s]`: run sequence s with float64 weights and activations (transformers' norms and RoPE still
        compute in float32): the float32 result's own rounding error is its distance to this one."""
        float64 = float64 or [False] * len(sequences)
        from transformers.cache_utils import DynamicCache
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
        from transformers.models.gemma4.modeling_gemma4 import KVSharingDict

        m, cfg = self.model, self.cfg
        calls = []  # per call: its state between layers
        for seq, wide in zip(sequences, float64, strict=True):
            cache = DynamicCache(config=cfg) if len(seq) > 1 else None
            # Masks depend on the cache's lengths before the call; layers run in layer-major order here, so a
            # second cache that only tracks lengths (zero-width K/V) stands in for the real one's state.
            lengths = DynamicCache(config=cfg) if cache is not None else None
            start = 0
            for ids in seq:
                with torch.no_grad():
                    embeds = self.embed(ids)
                    per_layer = None
                    if cfg.hidden_size_per_layer_input:
                        token_part = self._gathered(m.embed_tokens_per_layer, "embed_tokens_per_layer.weight", ids,
                                                    m.embed_tokens_per_layer.scalar_embed_scale)
                        token_part = token_part.reshape(1, len(ids), cfg.num_hidden_layers, -1)
                        if wide:
                            embeds, token_part = embeds.double(), token_part.double()
                        per_layer = _module(m.project_per_layer_inputs, wide)(embeds, token_part)
                    elif wide:
                        embeds = embeds.double()
                    position_ids = (torch.arange(len(ids)) + start).unsqueeze(0)
                    mask_kwargs = dict(config=cfg, inputs_embeds=embeds, attention_mask=None, cache=lengths,
                                       position_ids=position_ids)
                    masks = {"full_attention": create_causal_mask(**mask_kwargs),
                             "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
                    rope = {kind: m.rotary_emb(embeds, position_ids, kind) for kind in m.unique_layer_types}
                if lengths is not None:
                    zeros = torch.zeros(1, 1, len(ids), 1)
                    for idx in range(len(lengths.layers)):
                        if not lengths.is_dummy[idx]:
                            lengths.update(zeros, zeros, idx)
                calls.append(dict(hidden=embeds, per_layer=per_layer, position_ids=position_ids, masks=masks,
                                  rope=rope, cache=cache, shared=KVSharingDict(None), wide=wide))
                start += len(ids)

        for i, layer in enumerate(m.layers[: cfg.num_hidden_layers]):
            self._load(layer, f"layers.{i}")
            kind = cfg.layer_types[i]
            wide_layer = copy.deepcopy(layer).double() if any(float64) else None
            with torch.no_grad():
                for c in calls:
                    c["hidden"] = (wide_layer if c["wide"] else layer)(
                        c["hidden"], c["per_layer"][:, :, i, :] if c["per_layer"] is not None else None,
                        shared_kv_states=c["shared"], position_embeddings=c["rope"][kind],
                        attention_mask=c["masks"][kind], position_ids=c["position_ids"], cache=c["cache"])
            layer.to("meta")  # drop this layer's weights before the next layer's are read
            del wide_layer

        outputs, it = [], iter(calls)
        for seq, seq_keep in zip(sequences, keep, strict=True):
            outs = []
            for _ids, k in zip(seq, seq_keep, strict=True):
                c = next(it)
                with torch.no_grad():
                    hidden = _module(m.norm, c["wide"])(c["hidden"])
                    logits = self._logits(hidden[:, hidden.shape[1] - k :]) if k else torch.zeros(1, 0, 0)
                outs.append(Output(logits[0].float().numpy(), hidden[0].float().numpy(),
                                   {kind: (kv[0].float().numpy(), kv[1].float().numpy())
                                    for kind, kv in c["shared"].items()}))
            outputs.append(outs)
        return outputs


def _module(fn, wide: bool):
    """`fn` (a module, or a bound method of the text model) with its weights in float64 when `wide`."""
    if not wide:
        return fn
    owner = getattr(fn, "__self__", None)
    if owner is None:
        return copy.deepcopy(fn).double()
    return getattr(copy.deepcopy(owner).double(), fn.__name__)

"""Parity of a written bundle against the PyTorch model it came from (the oracle: transformers' classes).

Target: teacher-forced logits over a prompt longer than the sliding window, fed as prefill, a verify
chunk (S=5) and single-token decodes; greedy continuation equality with `generate`. Assistant: logits and
projected hidden for draft steps at positions inside and past the window, given identical inputs.
For quantized bundles the same checks run twice: against a PyTorch copy with the *same weight rounding*
(tests the graphs) and against the fp32 model (reports the accuracy cost of quantization).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from edgegen.export.quantize import Quant, dequantize
from edgegen.runtime.model import Bundle

# Thresholds an fp32 bundle must meet (the export fails otherwise).
TARGET_TOL = 1e-4
ASSISTANT_TOL = 1e-5
# Same-rounding tolerance for quantized bundles: the weights are identical, only the summation order
# (MatMulNBits vs torch matmul) differs, which grows with the width of the dot products.
QUANT_TOL = 1e-3

BUILTIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. Speculative decoding lets a small drafter propose "
    "several tokens that the large model verifies in a single pass, so the output stays exactly the same "
    "while each step of the large model yields more than one token. "
)
GREEDY_TOKENS = 16


def prompt_ids(bundle_dir: Path, pair, length: int, seed: int) -> list[int]:
    """Built-in text through the target's tokenizer when it has one, padded with seeded random ids."""
    ids: list[int] = []
    tok_file = Path(bundle_dir) / "tokenizer.json"
    if tok_file.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        ids = tok.encode(BUILTIN_TEXT * (1 + length // 20)).ids
    rng = np.random.default_rng(seed)
    vocab = pair.text_config.vocab_size
    while len(ids) < length:
        ids.append(int(rng.integers(4, vocab)))
    return ids[:length]


def rounded_copy(model: torch.nn.Module, quant: Quant, ple_scale: float | None = None) -> torch.nn.Module:
    """A copy whose Linear and embedding weights carry exactly the rounding the quantized graph uses."""
    if not quant.bits:
        return model
    m = copy.deepcopy(model)
    done: set[int] = set()
    with torch.no_grad():
        for mod in m.modules():
            w = getattr(mod, "weight", None)
            if not isinstance(mod, torch.nn.Linear | torch.nn.Embedding) or w is None or id(w) in done:
                continue
            done.add(id(w))
            arr = w.detach().float().numpy()
            if getattr(mod, "_edgegen_ple", False) and ple_scale:
                arr = dequantize(arr * np.float32(ple_scale), quant.bits, quant.block_for(arr.shape[1])) / np.float32(ple_scale)
            else:
                arr = dequantize(arr, quant.bits, quant.block_for(arr.shape[1]))
            w.copy_(torch.from_numpy(arr))
    return m


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _target_checks(bundle: Bundle, ref_model, ids: list[int]) -> dict:
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    cache = bundle.new_cache()
    n = len(ids)
    chunks = [(0, n - 7), (n - 7, n - 2), (n - 2, n - 1), (n - 1, n)]  # prefill, verify S=5, decodes
    got = []
    for a, b in chunks:
        logits, _ = bundle.target.forward(cache, ids[a:b], logits_to_keep=b - a)
        got.append(logits)
    got = np.concatenate(got)
    return {"max_abs_logits": _maxdiff(got, ref), "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def _greedy(bundle: Bundle, ids: list[int], n: int) -> list[int]:
    cache = bundle.new_cache()
    logits, _ = bundle.target.forward(cache, ids)
    out = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        logits, _ = bundle.target.forward(cache, [out[-1]])
        out.append(int(logits[-1].argmax()))
    return out


def _assistant_checks(bundle: Bundle, pair, ref_target, ref_assistant, ids: list[int], positions: list[int]) -> dict:
    """Draft steps at positions P (the cache holds [0, P)), inputs identical on both sides."""
    window = pair.text_config.sliding_window
    worst_l = worst_h = 0.0
    agree = []
    with torch.no_grad():
        out = ref_target(input_ids=torch.tensor([ids]), return_shared_kv_states=True, output_hidden_states=True)
        embed = (ref_target.model.language_model if hasattr(ref_target.model, "language_model")
                 else ref_target.model).embed_tokens
    stores = bundle.manifest.model.store_layers
    for p in positions:
        # The cache gets PyTorch's own store-layer K/V, so the check isolates the assistant graph.
        cache = bundle.new_cache()
        for kind, (k, v) in out.shared_kv_states.items():
            for name, t in ((f"past_key.{stores[kind]}", k), (f"past_value.{stores[kind]}", v)):
                buf = cache.values[name].numpy()
                buf[:, :, :p] = t[:, :, :p].numpy()
                cache.values[name].update_inplace(buf)
        cache.length = p
        token = ids[p]
        hidden = out.hidden_states[-1][:, p - 1 : p]
        logits, _, projected = bundle.assistant.step(cache, token, hidden.numpy())
        lo = {"sliding_attention": max(0, p - window), "full_attention": 0}
        shared = {k: (v[0][:, :, lo[k]:p], v[1][:, :, lo[k]:p]) for k, v in out.shared_kv_states.items()}
        with torch.no_grad():
            ref = ref_assistant(inputs_embeds=torch.cat([embed(torch.tensor([[token]])), hidden], -1),
                                position_ids=torch.tensor([[p]]), shared_kv_states=shared)
        worst_l = max(worst_l, _maxdiff(logits, ref.logits[0, 0].numpy()))
        worst_h = max(worst_h, _maxdiff(projected, ref.last_hidden_state[0, 0].numpy()))
        agree.append(int(logits.argmax()) == int(ref.logits[0, 0].argmax()))
    return {"max_abs_logits": worst_l, "max_abs_projected_hidden": worst_h, "top1_agreement": float(np.mean(agree))}


def verify_bundle(bundle_dir: Path, pair, tquant: Quant, aquant: Quant) -> dict:
    bundle = Bundle(bundle_dir)
    window = pair.text_config.sliding_window
    length = min(window + 24, bundle.manifest.model.max_context - GREEDY_TOKENS - 8)
    ids = prompt_ids(bundle_dir, pair, length, seed=0)
    positions = sorted({min(4, length - 1), min(window // 2, length - 1), length - 1})

    _mark_ple(pair.target)
    ple_scale = _ple_scale(pair)
    ref_t = rounded_copy(pair.target, tquant, ple_scale)
    ref_a = rounded_copy(pair.assistant, aquant)
    report: dict = {"prompt_tokens": length, "window": window, "quant": {"target": tquant.kind, "assistant": aquant.kind}}
    same = {"target": _target_checks(bundle, ref_t, ids),
            "assistant": _assistant_checks(bundle, pair, ref_t, ref_a, ids, positions)}
    with torch.no_grad():
        hf = ref_t.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                            min_new_tokens=GREEDY_TOKENS)[0, length:].tolist()
    same["target"]["greedy_equal"] = _greedy(bundle, ids, GREEDY_TOKENS) == hf
    report["vs_same_rounding" if tquant.bits or aquant.bits else "vs_pytorch"] = same
    ttol = TARGET_TOL if not tquant.bits else QUANT_TOL
    atol = ASSISTANT_TOL if not aquant.bits else QUANT_TOL
    checks = {
        "target_logits": {"value": same["target"]["max_abs_logits"], "tolerance": ttol},
        "assistant_logits": {"value": same["assistant"]["max_abs_logits"], "tolerance": atol},
        "assistant_projected_hidden": {"value": same["assistant"]["max_abs_projected_hidden"], "tolerance": atol},
    }
    for c in checks.values():
        c["passed"] = c["value"] <= c["tolerance"]
    checks["greedy_sequence"] = {"value": same["target"]["greedy_equal"], "passed": same["target"]["greedy_equal"]}
    report["checks"] = checks
    if tquant.bits or aquant.bits:
        # The cost of quantization: the bundle against the unrounded fp32 model.
        report["vs_fp32"] = {"target": _target_checks(bundle, pair.target, ids),
                             "assistant": _assistant_checks(bundle, pair, pair.target, pair.assistant, ids, positions)}
    return report


def _mark_ple(model) -> None:
    text = model.model.language_model if hasattr(model.model, "language_model") else model.model
    if getattr(text, "embed_tokens_per_layer", None) is not None:
        text.embed_tokens_per_layer._edgegen_ple = True


def _ple_scale(pair) -> float | None:
    emb = getattr(pair.text_model, "embed_tokens_per_layer", None)
    return float(emb.scalar_embed_scale) if emb is not None else None

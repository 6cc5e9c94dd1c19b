"""Parity of a written bundle against the PyTorch model it came from (the oracle: transformers' classes).

Target: teacher-forced logits over a prompt longer than the sliding window, fed as prefill, a verify
chunk (S=5) and single-token decodes; greedy continuation: the bundle's greedy tokens must be PyTorch's
argmax at every step (teacher-forced, which is equal to comparing with PyTorch's own greedy generation).
Assistant: logits and projected hidden for draft steps at positions inside and past the window, given
identical inputs (the runtime cache is filled with PyTorch's own store-layer K/V, so the check isolates the
assistant graph). For quantized bundles the checks run against PyTorch with the *same weight rounding*
(tests the graphs), and the bundle is also scored against the fp32 model (the accuracy cost of quantization).

Memory: the target reference is export/reference.py's layer-streamed transformers model (one decoder
layer's fp32 weights in memory at a time). The bundle runs first (its greedy tokens are part of the
reference's input) and is closed while the reference runs, so verification costs the larger of the
bundle's sessions and one layer, at any model size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgegen.export.moe import expert_quant
from edgegen.export.quantize import Quant, dequantize
from edgegen.export.reference import StreamedTarget, rounding_for
from edgegen.runtime.manifest import past_kv
from edgegen.runtime.model import Bundle

# Tolerances. Target: 1e-4 (the contract on small models) plus NOISE_FACTOR times PyTorch's own fp32
# error: the larger of its disagreement with itself (the same logits computed whole vs in the bundle's
# chunks) and its distance to the same reference in float64. fp32 summation-order noise grows with width,
# depth and prompt length, and a bundle's kernels sum in their own order: on the E2B-shaped slice at 536
# tokens, int4, PyTorch whole vs chunked differ by 5.0e-4, PyTorch fp32 vs fp64 by ~5e-3 and the bundle vs
# PyTorch by 1.6e-2 (MatMulNBits applies block scales to partial sums). Graph bugs show up far above it and
# in top-1 agreement. Assistant: 1e-5 plus 1e-4 of the largest logit (four layers, little noise).
TARGET_ATOL, NOISE_FACTOR = 1e-4, 4.0
ASSISTANT_ATOL, ASSISTANT_RTOL = 1e-5, 1e-4
MIN_TOP1 = 0.98  # teacher-forced top-1 agreement with the reference (near-ties may flip)
# int8 activations (--compute int8) round every matmul input and float16 K/V every cached row, so such a
# bundle is judged by the logits' signal-to-noise ratio against the same-rounding reference, not by top-1:
# on near-flat logits (the
# random-weight E2B stand-in: 262k tokens, margins of a few hundredths) a 3% error flips 9% of the argmaxes
# without being any less accurate. Measured: trained demo pair 45 dB, E2B stand-in 32 dB; a graph bug is
# near 0 dB. (For scale, the stand-in's int4 weight rounding alone is 6 dB against fp32.)
MIN_SQNR_DB = 25.0
BUILTIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. Speculative decoding lets a small drafter propose "
    "several tokens that the large model verifies in a single pass, so the output stays exactly the same "
    "while each step of the large model yields more than one token. "
)
GREEDY_TOKENS = 16
COMPARED_PREFILL = 25  # prefill positions whose logits are compared (the last ones, past the window)


@dataclass
class Case:
    """One prompt and what PyTorch computed for it (fp32, and with the bundle's rounding)."""

    ids: list[int]
    positions: list[int]
    continuation: list[int] = field(default_factory=list)  # the bundle's greedy tokens, teacher-forced
    target_logits: dict[str, np.ndarray] = field(default_factory=dict)  # tag -> [compared, V]
    noise: dict[str, float] = field(default_factory=dict)  # tag -> PyTorch whole vs chunked, max |diff|
    fp64_error: dict[str, float] = field(default_factory=dict)  # tag -> PyTorch fp32 vs float64, max |diff|
    greedy: dict[str, list[int]] = field(default_factory=dict)  # tag -> PyTorch argmax after each greedy prefix
    store_kv: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # kind -> K, V [.., n, d]
    hidden: np.ndarray | None = None  # [n, H] target last hidden (post-norm)
    assistant: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # tag -> per pos


def prompt_ids(bundle_dir: Path, vocab: int, length: int, seed: int = 0) -> list[int]:
    """Built-in text through the bundle's tokenizer when it has one, padded with seeded random ids."""
    ids: list[int] = []
    tok_file = Path(bundle_dir) / "tokenizer.json"
    if tok_file.is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tok_file)).encode(BUILTIN_TEXT * (1 + length // 20)).ids
    rng = np.random.default_rng(seed)
    while len(ids) < length:
        ids.append(int(rng.integers(4, vocab)))
    return ids[:length]


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(0, n - 7), (n - 7, n - 2), (n - 2, n - 1), (n - 1, n)]  # prefill, verify S=5, two decodes


def _compared(n: int) -> slice:
    return slice(max(0, n - 7 - COMPARED_PREFILL), n)


def round_in_place(model: torch.nn.Module, quant: Quant, ple_scale: float | None = None) -> None:
    """Give Linear, embedding and expert weights exactly the rounding the quantized graphs use."""
    done: set[int] = set()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("router"):  # the router stays fp32 in the graphs (export/moe.py)
                done.update(id(p) for p in mod.parameters())
            if hasattr(mod, "gate_up_proj") and mod.gate_up_proj.dim() == 3:  # stacked experts: each rounded alone
                eq = expert_quant(quant)
                for p in (mod.gate_up_proj, mod.down_proj):
                    p.copy_(torch.from_numpy(np.stack([dequantize(e, eq.bits, eq.block_for(e.shape[1]))
                                                       for e in p.detach().float().numpy()])))
                continue
            w = getattr(mod, "weight", None)
            if not isinstance(mod, torch.nn.Linear | torch.nn.Embedding) or w is None or id(w) in done:
                continue
            done.add(id(w))
            arr = w.detach().float().numpy()
            if getattr(mod, "_edgegen_ple", False) and ple_scale:
                # The host PLE table is quantized with its scale folded in (see contents.write_ple).
                s = np.float32(ple_scale)
                arr = dequantize(arr * s, quant.bits, quant.block_for(arr.shape[1])) / s
            else:
                arr = dequantize(arr, quant.bits, quant.block_for(arr.shape[1]))
            w.copy_(torch.from_numpy(arr))


def _text_model(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def _pytorch_target(case: Case, target: StreamedTarget, tag: str, checked: bool) -> None:
    """One layer-streamed pass: the prompt + greedy continuation whole (compared logits, greedy argmaxes,
    hidden states, store K/V) and, for the `checked` reference, PyTorch's own fp32 error: the prompt in the
    bundle's chunks, and the prompt in float64."""
    n = len(case.ids)
    whole = case.ids + case.continuation[:-1]
    first = _compared(n).start
    sequences, keep, wide = [[whole]], [[len(whole) - first]], [False]
    if checked:
        sequences += [[case.ids[a:b] for a, b in _chunks(n)], [case.ids]]
        keep += [[b - max(a, first) for a, b in _chunks(n)], [n - first]]
        wide += [False, True]
    outs = target.run(sequences, keep, wide)
    logits = outs[0][0].logits  # rows first .. len(whole)-1
    case.target_logits[tag] = logits[: n - first].copy()
    case.greedy[tag] = [int(t) for t in logits[n - 1 - first :].argmax(-1)]
    if checked:
        chunked = np.concatenate([o.logits for o in outs[1]])
        case.noise[tag] = float(np.abs(chunked - case.target_logits[tag]).max())
        case.fp64_error[tag] = float(np.abs(outs[2][0].logits - case.target_logits[tag]).max())
    if case.hidden is None:  # the assistant's inputs come from the fp32 target in every comparison
        case.hidden = outs[0][0].hidden[:n].copy()
        case.store_kv = {k: (kv[0][:, :, :n].copy(), kv[1][:, :, :n].copy())
                         for k, kv in outs[0][0].shared_kv.items()}


def _pytorch_assistant(case: Case, target: StreamedTarget, assistant, window: int, tag: str) -> None:
    results = []
    for p in case.positions:
        lo = {"sliding_attention": max(0, p - window), "full_attention": 0}
        shared = {k: (torch.from_numpy(kv[0][:, :, lo[k]:p]), torch.from_numpy(kv[1][:, :, lo[k]:p]))
                  for k, kv in case.store_kv.items()}
        hidden = torch.from_numpy(case.hidden[p - 1 : p]).unsqueeze(0)
        with torch.no_grad():
            ref = assistant(inputs_embeds=torch.cat([target.embed([case.ids[p]]), hidden], -1),
                            position_ids=torch.tensor([[p]]), shared_kv_states=shared)
        results.append((ref.logits[0, 0].numpy().copy(), ref.last_hidden_state[0, 0].numpy().copy()))
    case.assistant[tag] = results


def new_case(pair, bundle_dir: Path, max_context: int) -> Case:
    """The verification prompt: longer than the sliding window (fits the context), draft positions inside and
    past the window."""
    cfg = pair.text_config
    window = cfg.sliding_window
    length = max(8, min(window + 24, max_context - GREEDY_TOKENS - 8))
    return Case(prompt_ids(bundle_dir, cfg.vocab_size, length),
                sorted({min(4, length - 1), min(max(window // 2, 1), length - 1), length - 1}))


def references(pair, case: Case, tquant: Quant, aquant: Quant) -> None:
    """Everything PyTorch computes for the checks, into `case` (whose `continuation` is the bundle's greedy
    output). Rounds the pair's assistant in place when quantized: call it last before freeing the pair."""
    cfg = pair.text_config
    quantized = bool(tquant.bits or aquant.bits)
    fp32 = StreamedTarget(pair.weights, cfg, pair.lm_head)
    _pytorch_target(case, fp32, "fp32", checked=not quantized)
    _pytorch_assistant(case, fp32, pair.assistant, cfg.sliding_window, "fp32")
    if quantized:
        rounded = StreamedTarget(pair.weights, cfg, pair.lm_head, rounding_for(tquant)) if tquant.bits else fp32
        if aquant.bits:
            round_in_place(pair.assistant, aquant)
        _pytorch_target(case, rounded, "rounded", checked=True)
        _pytorch_assistant(case, rounded, pair.assistant, cfg.sliding_window, "rounded")


# -- the bundle side -------------------------------------------------------------------------------------


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _sqnr_db(got, ref) -> float:
    """Signal-to-quantization-noise ratio of logits, in dB: the reference's spread around each row's mean
    (what softmax sees) over the error's. 20 dB: the error's RMS is a tenth of the logits' spread."""
    ref = np.asarray(ref, np.float64).reshape(-1, np.shape(ref)[-1])
    err = np.asarray(got, np.float64).reshape(ref.shape) - ref
    signal = ((ref - ref.mean(-1, keepdims=True)) ** 2).sum()
    noise = ((err - err.mean(-1, keepdims=True)) ** 2).sum()
    return float(10 * np.log10(signal / noise)) if noise > 0 else float("inf")


def _bundle_target(bundle: Bundle, ids: list[int]) -> np.ndarray:
    """Logits of the compared positions, fed as the runtime feeds them (prefill, verify, decodes). Each call
    returns only the rows compared: a full-vocabulary row is 1 MB at 262k tokens."""
    cache, first = bundle.new_cache(), _compared(len(ids)).start
    got = [bundle.target.forward(cache, ids[a:b], logits_to_keep=b - max(a, first))[0] for a, b in _chunks(len(ids))]
    return np.concatenate(got)


def _bundle_greedy(bundle: Bundle, ids: list[int], n: int) -> list[int]:
    cache = bundle.new_cache()
    logits, _ = bundle.target.forward(cache, ids)
    out = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        logits, _ = bundle.target.forward(cache, [out[-1]])
        out.append(int(logits[-1].argmax()))
    return out


def _bundle_assistant(bundle: Bundle, case: Case) -> list[tuple[np.ndarray, np.ndarray]]:
    stores = bundle.manifest.model.store_layers
    out = []
    for p in case.positions:
        cache = bundle.new_cache()
        for kind, (k, v) in case.store_kv.items():
            for name, t in zip(past_kv(stores[kind]), (k, v), strict=True):
                cache.write(name, t[:, :, :p])
        cache.length = p
        logits, _, projected = bundle.assistant.step(cache, case.ids[p], case.hidden[p - 1])
        out.append((logits, projected))
    return out


def _draft_round_matches(bundle: Bundle, ids: list[int]) -> bool:
    """The fused round must draft exactly what `steps` single assistant calls draft."""
    if bundle.draft_round is None:
        return True
    cache = bundle.new_cache()
    _, hidden = bundle.target.forward(cache, ids)
    token = ids[-1]
    fused, _ = bundle.draft_round.run_round(cache, token, hidden[-1])
    steps, h = [], hidden[-1]
    for _ in range(bundle.draft_round.steps):
        _, token, h = bundle.assistant.step(cache, token, h)
        steps.append(token)
    return fused == steps


def _scores(got_t, ref_t, got_a, ref_a) -> dict:
    return {
        "target": {"max_abs_logits": _maxdiff(got_t, ref_t), "max_abs_reference": float(np.abs(ref_t).max()),
                   "sqnr_db": _sqnr_db(got_t, ref_t),
                   "top1_agreement": float((got_t.argmax(-1) == ref_t.argmax(-1)).mean())},
        "assistant": {
            "max_abs_logits": max(_maxdiff(g[0], r[0]) for g, r in zip(got_a, ref_a, strict=True)),
            "max_abs_projected_hidden": max(_maxdiff(g[1], r[1]) for g, r in zip(got_a, ref_a, strict=True)),
            "max_abs_reference": max(float(np.abs(r[0]).max()) for r in ref_a),
            "top1_agreement": float(np.mean([int(g[0].argmax()) == int(r[0].argmax())
                                             for g, r in zip(got_a, ref_a, strict=True)])),
        },
    }


def verify_bundle(pair, bundle_dir: Path, max_context: int, tquant: Quant, aquant: Quant) -> dict:
    """Run the bundle, then the layer-streamed PyTorch reference, then the bundle's assistant on the
    reference's inputs, and score; `checks` decide whether export passes. The bundle's sessions are closed
    while the reference runs, so the peak is the larger of the two, not their sum."""
    import gc

    case = new_case(pair, bundle_dir, max_context)
    bundle = Bundle(bundle_dir, hashes="never")  # export hashed these files a moment ago
    half_kv = any(b.dtype == "float16" for b in bundle.manifest.model.kv_buffers)
    got_t = _bundle_target(bundle, case.ids)
    case.continuation = _bundle_greedy(bundle, case.ids, GREEDY_TOKENS)
    fused = _draft_round_matches(bundle, case.ids)
    del bundle
    gc.collect()
    references(pair, case, tquant, aquant)
    got_a = _bundle_assistant(Bundle(bundle_dir, hashes="never"), case)
    return _report(case, got_t, got_a, fused, tquant, aquant, half_kv)


def _report(case: Case, got_t, got_a, fused: bool, tquant: Quant, aquant: Quant, half_kv: bool = False) -> dict:
    quantized = "rounded" in case.target_logits
    tag = "rounded" if quantized else "fp32"
    same = _scores(got_t, case.target_logits[tag], got_a, case.assistant[tag])
    same["target"]["greedy_equal"] = case.greedy[tag] == case.continuation
    report: dict = {"prompt_tokens": len(case.ids), "draft_positions": case.positions,
                    "quant": {"target": tquant.kind, "assistant": aquant.kind},
                    # quantized matmuls' compute: exact = fp32 activations, int8 = int8 activations
                    "compute": {"target": _compute(tquant), "assistant": _compute(aquant)},
                    "vs_same_rounding" if quantized else "vs_pytorch": same}
    same["target"]["pytorch_self_noise"] = case.noise[tag]
    same["target"]["pytorch_fp64_error"] = case.fp64_error[tag]
    ttol = TARGET_ATOL + NOISE_FACTOR * max(case.noise[tag], case.fp64_error[tag])
    atol = ASSISTANT_ATOL + ASSISTANT_RTOL * same["assistant"]["max_abs_reference"]
    checks = {
        "target_logits": {"value": same["target"]["max_abs_logits"], "tolerance": ttol},
        "assistant_logits": {"value": same["assistant"]["max_abs_logits"], "tolerance": atol},
        "assistant_projected_hidden": {"value": same["assistant"]["max_abs_projected_hidden"], "tolerance": atol},
    }
    for c in checks.values():
        c["passed"] = c["value"] <= c["tolerance"]
    top1 = {"value": same["target"]["top1_agreement"], "minimum": MIN_TOP1}
    greedy_check = {"value": same["target"]["greedy_equal"], "passed": same["target"]["greedy_equal"]}
    if tquant.accuracy_level or aquant.accuracy_level or half_kv:
        # int8 activations and float16 K/V are not bit-faithful (float16 rounds every K/V element to 11
        # significant bits; the reference attends in float32): the logit differences, top-1 agreement and
        # the greedy comparison are reported, and the export is judged on the logits' SQNR against the
        # same-rounding reference (and the fused round).
        report["int8_compute" if tquant.accuracy_level or aquant.accuracy_level else "fp16_kv"] = {
            **checks, "greedy_sequence": greedy_check, "target_top1": {**top1, "passed": top1["value"] >= MIN_TOP1}}
        sqnr = same["target"]["sqnr_db"]
        checks = {"target_sqnr_db": {"value": sqnr, "minimum": MIN_SQNR_DB, "passed": sqnr >= MIN_SQNR_DB}}
    else:
        checks["greedy_sequence"] = greedy_check
        checks["target_top1"] = {**top1, "passed": top1["value"] >= MIN_TOP1}
    checks["draft_round_equals_steps"] = {"value": fused, "passed": fused}
    report["checks"] = checks
    if quantized:
        report["vs_fp32"] = _scores(got_t, case.target_logits["fp32"], got_a, case.assistant["fp32"])
    return report


def _compute(quant: Quant) -> str:
    return "int8" if quant.bits and quant.accuracy_level == 4 else "exact"


def rounded_copy(model: torch.nn.Module, quant: Quant, ple_scale: float | None = None) -> torch.nn.Module:
    """A copy of `model` with the bundle's weight rounding (for tests comparing like with like)."""
    import copy

    if not quant.bits:
        return model
    _mark_ple(model)
    m = copy.deepcopy(model)
    round_in_place(m, quant, ple_scale)
    return m


def _mark_ple(model) -> None:
    ple = getattr(_text_model(model), "embed_tokens_per_layer", None)
    if ple is not None:
        ple._edgegen_ple = True

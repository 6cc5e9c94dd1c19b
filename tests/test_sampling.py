"""Sampling exactness: speculative sampling emits tokens from exactly the target's processed distribution.

Two levels. Unit: `accept_sampled` on synthetic p (target logits) and q (draft probabilities) over a
vocabulary of 8, checked against an independent reference of the processed softmax. End to end: a
vocabulary-16 pair exported to a real bundle, whose emitted sequences are compared with the exact
sequence distribution computed by transformers, and with plain (non-speculative) sampling.

Statistics: Pearson chi-square with cells of expected count < 5 pooled; p-values from the Wilson–Hilferty
approximation (scipy is not a dependency). All randomness is seeded, so each test is deterministic; a test
that checks several p-values requires each to exceed 0.01 / (their number), so the test as a whole has a
1% false-alarm rate.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.generate import Generator
from edgegen.runtime.model import Bundle
from edgegen.runtime.sampling import Sampling, accept_sampled, probabilities

ALPHA = 0.01


# -- statistics ----------------------------------------------------------------------------------------


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df), Wilson–Hilferty: (X/df)^(1/3) is close to normal."""
    if df <= 0:
        return 1.0
    v = 2.0 / (9.0 * df)
    z = ((stat / df) ** (1.0 / 3.0) - (1.0 - v)) / math.sqrt(v)
    return 1.0 - NormalDist().cdf(z)


def _pool_small(expected: np.ndarray) -> list[np.ndarray]:
    """Groups of cell indices: cells with expected >= 5 alone, the rest pooled (grown until >= 5)."""
    order = np.argsort(expected, kind="stable")
    groups: list[np.ndarray] = []
    pool: list[int] = []
    pooled = 0.0
    for i in order:
        if pooled < 5 or expected[i] < 5:
            pool.append(int(i))
            pooled += expected[i]
        else:
            groups.append(np.array([i]))
    groups.append(np.array(pool))
    return [g for g in groups if len(g)]


def gof_pvalue(observed: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of counts to probabilities. Cells of probability 0 must be empty (asserted)."""
    observed, probs = np.asarray(observed, np.float64), np.asarray(probs, np.float64)
    assert abs(probs.sum() - 1) < 1e-9
    assert observed[probs == 0].sum() == 0, "a sample fell where the distribution has no mass"
    live = probs > 0
    obs, exp = observed[live], observed.sum() * probs[live]
    groups = _pool_small(exp)
    o = np.array([obs[g].sum() for g in groups])
    e = np.array([exp[g].sum() for g in groups])
    return chi2_sf(float(((o - e) ** 2 / e).sum()), len(groups) - 1)


def homogeneity_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square test that two count vectors over the same categories come from one distribution."""
    table = np.stack([np.asarray(a, np.float64), np.asarray(b, np.float64)])
    table = table[:, table.sum(0) > 0]
    rows, cols, n = table.sum(1), table.sum(0), table.sum()
    # Pool columns whose smaller expected cell is below 5.
    groups = _pool_small(cols * rows.min() / n)
    pooled = np.stack([table[:, g].sum(1) for g in groups], axis=1)
    expected = np.outer(rows, pooled.sum(0)) / n
    return chi2_sf(float(((pooled - expected) ** 2 / expected).sum()), pooled.shape[1] - 1)


def test_chi2_sf_matches_known_quantiles() -> None:
    # 0.99 quantiles of chi-square: df 5 -> 15.086, df 20 -> 37.566, df 100 -> 135.807.
    for df, q99 in ((5, 15.086), (20, 37.566), (100, 135.807)):
        assert chi2_sf(q99, df) == pytest.approx(0.01, abs=0.0015)
    assert chi2_sf(0.0, 3) > 0.99


def test_the_tests_detect_a_wrong_distribution() -> None:
    """The statistics are not vacuous: a 4-point shift in one cell over 20,000 samples is rejected."""
    rng = np.random.default_rng(0)
    p = np.array([0.3, 0.3, 0.2, 0.1, 0.1])
    wrong = np.array([0.34, 0.26, 0.2, 0.1, 0.1])
    right_counts = np.bincount(rng.choice(5, 20_000, p=p), minlength=5)
    wrong_counts = np.bincount(rng.choice(5, 20_000, p=wrong), minlength=5)
    assert gof_pvalue(right_counts, p) > ALPHA
    assert gof_pvalue(wrong_counts, p) < 1e-6
    assert homogeneity_pvalue(right_counts, wrong_counts) < 1e-6


# -- probabilities: temperature, top-k, top-p ----------------------------------------------------------


def reference_probs(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Independent reference: softmax(logits / T) on the k largest logits, then the smallest prefix of the
    descending probabilities whose mass reaches top_p, renormalised. Assumes distinct logits."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.ones(len(z), bool)
    if top_k:
        keep[order[top_k:]] = False
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        n = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
        nucleus = np.zeros(len(z), bool)
        nucleus[order[:n]] = True
        p = np.where(nucleus, p, 0.0)
        p /= p.sum()
    return p


def _logits(seed: int, v: int = 12, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(v) * scale).astype(np.float32)


def test_temperature_scales_the_softmax() -> None:
    logits = _logits(1)
    entropies, peaks = [], []
    for t in (0.05, 0.25, 0.5, 1.0, 2.0, 8.0):
        p = probabilities(logits, Sampling(temperature=t))
        z = logits.astype(np.float64) / t
        expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(p, expected, rtol=1e-9, atol=1e-12)
        entropies.append(-(p[p > 0] * np.log(p[p > 0])).sum())
        peaks.append(p.max())
    assert (np.diff(entropies) > 0).all()  # higher temperature: flatter
    assert (np.diff(peaks) < 0).all()
    assert probabilities(logits, Sampling(temperature=0.05)).argmax() == logits.argmax()
    assert probabilities(logits, Sampling(temperature=1e-3)).max() == pytest.approx(1.0)  # towards greedy


def test_top_k_keeps_exactly_the_k_largest() -> None:
    logits = _logits(2)
    full = probabilities(logits, Sampling(temperature=1.0))
    for k in range(1, len(logits) + 3):
        p = probabilities(logits, Sampling(temperature=1.0, top_k=k))
        kept = np.flatnonzero(p)
        assert len(kept) == min(k, len(logits))
        assert set(kept) == set(np.argsort(-logits)[:k])
        assert p.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(p[kept], full[kept] / full[kept].sum(), rtol=1e-9)  # ratios unchanged


def test_top_p_keeps_the_smallest_nucleus() -> None:
    for seed in range(5):
        logits = _logits(10 + seed)
        full = probabilities(logits, Sampling(temperature=1.0))
        desc = np.sort(full)[::-1]
        for top_p in (0.05, 0.3, 0.5, 0.77, 0.9, 0.999):
            p = probabilities(logits, Sampling(temperature=1.0, top_p=top_p))
            kept = np.flatnonzero(p)
            mass = full[kept].sum()
            assert mass >= top_p - 1e-12  # reaches top_p ...
            assert mass - full[kept].min() < top_p  # ... and no kept token could be dropped
            assert set(kept) == set(np.argsort(-full)[: len(kept)])  # the most likely ones
            assert mass == pytest.approx(desc[: len(kept)].sum())
            np.testing.assert_allclose(p, reference_probs(logits, top_p=top_p), rtol=1e-9, atol=1e-15)


def test_processing_combinations_match_the_reference() -> None:
    logits = _logits(3)
    for t, k, top_p in [(0.7, 5, 0.9), (1.3, 3, 0.6), (1.0, 0, 0.8), (0.5, 12, 1.0), (2.0, 1, 0.3)]:
        p = probabilities(logits, Sampling(temperature=t, top_k=k, top_p=top_p))
        np.testing.assert_allclose(p, reference_probs(logits, t, k, top_p), rtol=1e-9, atol=1e-15)
    off = probabilities(logits, Sampling(temperature=1.0, top_k=0, top_p=1.0))
    np.testing.assert_allclose(off, reference_probs(logits), rtol=1e-12)


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": -3},
                                    {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_sampling_options_are_user_errors(kwargs) -> None:
    with pytest.raises(EdgegenError) as err:
        Sampling(**kwargs)
    assert "\n" not in str(err.value)


# -- accept_sampled on synthetic distributions ---------------------------------------------------------

V, K, SAMPLES = 8, 2, 20_000


def _draw(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws, one per uniform in u."""
    return np.minimum(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"), len(probs) - 1)


def simulate(target_logits: np.ndarray, draft_probs: np.ndarray, s: Sampling, seed: int):
    """SAMPLES rounds of: draft K tokens from q, accept/resample, then (as the loop's next rounds would,
    for a target whose rows do not depend on the prefix) plain samples for the remaining positions.
    Returns the emitted K+1 positions per round and the accept counts."""
    target = np.stack([reference_probs(row, s.temperature, s.top_k, s.top_p) for row in target_logits])
    draft_rng, tail_rng, rng = (np.random.default_rng(seed + i) for i in range(3))
    u = draft_rng.random((SAMPLES, K))
    drafts = np.stack([_draw(draft_probs[i], u[:, i]) for i in range(K)], axis=1)
    tails = np.stack([_draw(target[i], tail_rng.random(SAMPLES)) for i in range(K + 1)], axis=1)
    out = np.empty((SAMPLES, K + 1), np.int64)
    accepted = np.empty(SAMPLES, np.int64)
    for r in range(SAMPLES):
        m, nxt = accept_sampled([int(d) for d in drafts[r]], list(draft_probs), target_logits, s, rng)
        seq = [*drafts[r, :m], nxt]
        out[r] = [*seq, *tails[r, len(seq):]]
        accepted[r] = m
    return out, accepted, target


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _case(name: str):
    rng = np.random.default_rng(sum(map(ord, name)))
    target_logits = (rng.standard_normal((K + 1, V)) * 1.5).astype(np.float32)
    draft_logits = (rng.standard_normal((K, V)) * 1.5).astype(np.float32)
    if name == "plain":
        return target_logits, _softmax(draft_logits.astype(np.float64)), Sampling(temperature=1.0)
    if name == "drafter-misses-tokens":  # q is zero on tokens where p is not: only the resample reaches them
        q = np.stack([reference_probs(row, top_k=3) for row in draft_logits])
        return target_logits, q, Sampling(temperature=1.0)
    if name == "processed":  # as the loop does: the same temperature/top-k/top-p on p and q
        s = Sampling(temperature=0.7, top_k=5, top_p=0.9)
        return target_logits, np.stack([probabilities(row, s) for row in draft_logits]), s
    if name == "confident-wrong-drafter":  # q peaked on the target's least likely token
        q = np.full((K, V), 0.02)
        q[np.arange(K), target_logits[:K].argmin(-1)] = 1 - 0.02 * (V - 1)
        return target_logits, q, Sampling(temperature=1.3)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["plain", "drafter-misses-tokens", "processed", "confident-wrong-drafter"])
def test_accept_sampled_emits_the_target_distribution(name: str) -> None:
    target_logits, q, s = _case(name)
    out, accepted, target = simulate(target_logits, q, s, seed=7)
    # Both branches ran: some drafts accepted, some rejected.
    assert 0 < (accepted > 0).mean() < 1 and (accepted < K).any()
    first = np.bincount(out[:, 0], minlength=V)
    joint = np.bincount(np.ravel_multi_index(out.T, (V,) * (K + 1)), minlength=V ** (K + 1))
    joint_p = np.einsum("i,j,k->ijk", *target).ravel()
    pvalues = [gof_pvalue(first, target[0])] + [gof_pvalue(np.bincount(out[:, i], minlength=V), target[i])
                                                for i in range(1, K + 1)] + [gof_pvalue(joint, joint_p)]
    assert min(pvalues) > ALPHA / len(pvalues), pvalues


def test_identical_draft_and_target_always_accept() -> None:
    """q == p: u * q[d] < p[d] for every u < 1, so every draft is accepted (and the output is still p)."""
    target_logits, _, s = _case("processed")
    q = np.stack([probabilities(row, s) for row in target_logits[:K]])
    out, accepted, target = simulate(target_logits, q, s, seed=11)
    assert (accepted == K).all()
    assert gof_pvalue(np.bincount(out[:, 0], minlength=V), target[0]) > ALPHA


# -- end to end: the real loop on a vocabulary-16 bundle -----------------------------------------------


@pytest.fixture(scope="module")
def one_torch_thread():
    """A tiny model: a second torch thread only spin-waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROMPT = [2, 14]
NEW_TOKENS = 4  # one token from prefill, then a round of two drafts and a bonus
DRAFTS = 2  # = the bundle's fused draft_round steps: without top-k/top-p the first round is one fused call
STOP = -1  # category for positions after an EOS


@pytest.fixture(scope="module", params=["e2b-like", "moe-like"])
def small_vocab(request, tmp_path_factory, one_torch_thread):
    """A vocabulary-16 pair (no tokenizer: ids only) exported to a bundle; returns (bundle, target model).
    Once per structure: the E2B-like pair (centroid head, KV sharing) and the 26B-A4B-like mixture of experts.

    init_std stays at the preset's 0.06: larger values make the target's next-token distribution one-hot.
    """
    from transformers import GenerationConfig

    from edgegen.export.bundle import ExportOptions, export_bundle
    from edgegen.export.testing import BOS_ID, END_OF_TURN_ID, EOS_ID, PAD_ID, PRESETS, build_assistant, build_target

    preset = replace(PRESETS[request.param], vocab_size=16, num_centroids=4, centroid_top_k=2)
    out = tmp_path_factory.mktemp(f"vocab16-{request.param}")
    target = build_target(preset, seed=0)
    target.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, END_OF_TURN_ID],
                                                pad_token_id=PAD_ID, do_sample=False)
    target.save_pretrained(out / "target")
    build_assistant(preset, seed=0).save_pretrained(out / "assistant")
    # A 2-step fused draft_round: the first round of a 4-token generation uses it, later rounds single steps.
    export_bundle(str(out / "target"), str(out / "assistant"), out / "bundle",
                  ExportOptions(max_context=64, draft_tokens=DRAFTS))
    return out / "bundle", target


def exact_sequences(target, prompt: list[int], n_new: int, eos: set[int], s: Sampling) -> dict[tuple, float]:
    """Probability of every emitted sequence (ending at an EOS or after n_new tokens), from transformers."""
    alive: dict[tuple, float] = {(): 1.0}
    final: dict[tuple, float] = {}
    for step in range(n_new):
        prefixes = list(alive)
        with torch.no_grad():
            logits = target(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1].double().numpy()
        nxt: dict[tuple, float] = {}
        for prefix, row in zip(prefixes, logits, strict=True):
            for tok, pr in enumerate(reference_probs(row, s.temperature, s.top_k, s.top_p)):
                if pr == 0:
                    continue
                seq = (*prefix, tok)
                (final if tok in eos or step == n_new - 1 else nxt)[seq] = alive[prefix] * pr
        alive = nxt
    assert sum(final.values()) == pytest.approx(1.0)
    return final


def run_many(bundle: Path, s: Sampling, n: int, use_assistant: bool, seed0: int):
    """n generations of NEW_TOKENS from PROMPT, seeds seed0.. ; counts of each emitted sequence."""
    gen = Generator(bundle, threads=1, draft_tokens=DRAFTS)
    fused_calls = 0
    real_round = gen.bundle.draft_round.run_round

    def counted_round(*args, **kwargs):
        nonlocal fused_calls
        fused_calls += 1
        return real_round(*args, **kwargs)

    gen.bundle.draft_round.run_round = counted_round
    counts: Counter = Counter()
    drafted = accepted = 0
    t0 = time.perf_counter()
    for i in range(n):
        gen.reset()
        r = gen.generate(PROMPT, NEW_TOKENS, sampling=replace(s, seed=seed0 + i), use_assistant=use_assistant)
        counts[tuple(r.token_ids)] += 1
        drafted += r.stats.drafted
        accepted += r.stats.accepted
    return counts, {"drafted": drafted, "accepted": accepted, "fused_calls": fused_calls,
                    "seconds": time.perf_counter() - t0}


def _position(seq: tuple, i: int) -> int:
    return seq[i] if i < len(seq) else STOP


def _marginal(counts_or_probs: dict, i: int, cats: list[int]) -> np.ndarray:
    out = np.zeros(len(cats))
    for seq, c in counts_or_probs.items():
        out[cats.index(_position(seq, i))] += c
    return out


E2E = [
    # Without top-k/top-p the first round is one fused draft_round call (Gumbel-max sampling in the graph).
    pytest.param(Sampling(temperature=1.0), 5_000, id="t1-5k"),
    # With them, drafts are sampled on the host from single assistant steps.
    pytest.param(Sampling(temperature=0.8, top_k=6, top_p=0.9), 5_000, id="t08-topk6-topp09-5k"),
    pytest.param(Sampling(temperature=1.0), 20_000, id="t1-20k", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("sampling", "n"), E2E)
def test_speculative_sampling_end_to_end(small_vocab, sampling: Sampling, n: int) -> None:
    bundle, target = small_vocab
    loaded = Bundle(bundle)
    manifest = loaded.manifest
    assert loaded.draft_round is not None and loaded.draft_round.steps == DRAFTS
    eos, vocab = set(manifest.generation["eos_token_ids"]), manifest.model.vocab_size
    exact = exact_sequences(target, PROMPT, NEW_TOKENS, eos, sampling)
    spec, info = run_many(bundle, sampling, n, use_assistant=True, seed0=0)
    # Both the accept and the reject/resample paths ran many times, through the intended drafter graph.
    assert info["accepted"] >= 100 and info["drafted"] - info["accepted"] >= 100, info
    fused = sampling.top_k == 0 and sampling.top_p == 1.0
    # (every generation not ended by an EOS at its first token opens with a fused round)
    assert (info["fused_calls"] > 0.8 * n) if fused else (info["fused_calls"] == 0), info

    seqs = sorted(exact)
    assert set(spec) <= set(exact), "a sequence of probability 0 was emitted"
    cats = [*range(vocab), STOP]
    pvalues = {"joint": gof_pvalue([spec[q] for q in seqs], [exact[q] for q in seqs])}
    for i in range(NEW_TOKENS):
        pvalues[f"position {i + 1}"] = gof_pvalue(_marginal(spec, i, cats), _marginal(exact, i, cats))

    plain_s = 0.0
    if fused:  # and against plain sampling through the same runtime (once per test run is enough)
        plain, plain_info = run_many(bundle, sampling, n, use_assistant=False, seed0=10**6)
        assert plain_info["drafted"] == 0
        plain_s = plain_info["seconds"]
        pvalues["joint vs plain"] = homogeneity_pvalue([spec[q] for q in seqs], [plain[q] for q in seqs])
        for i in range(NEW_TOKENS):
            pvalues[f"position {i + 1} vs plain"] = homogeneity_pvalue(_marginal(spec, i, cats),
                                                                       _marginal(plain, i, cats))
    print(f"\n{n} speculative runs {info['seconds']:.1f}s, plain {plain_s:.1f}s; "
          f"acceptance {info['accepted'] / info['drafted']:.3f}; "
          f"p-values {({k: round(v, 4) for k, v in pvalues.items()})}")
    assert min(pvalues.values()) > ALPHA / len(pvalues), pvalues

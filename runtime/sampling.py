"""Turning logits into tokens: greedy, and speculative sampling that provably keeps the target's distribution.

The same `probabilities` transform (temperature, top-k, top-p) is applied to the target's p and the
drafter's q, so the acceptance rule below samples exactly from the processed p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgegen.runtime.errors import EdgegenError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self):
        number = (int, float, np.integer, np.floating)
        if not all(isinstance(x, number) and not isinstance(x, bool) for x in (self.temperature, self.top_p)) or \
                not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or \
                not (self.seed is None or isinstance(self.seed, (int, np.integer))):
            raise EdgegenError("sampling options have the wrong type: temperature and top_p are numbers, top_k an "
                               "integer, seed None or an integer")
        if self.seed is not None and self.seed < 0:
            raise EdgegenError(f"seed {self.seed} is invalid; use an integer >= 0")
        if not (self.temperature == 0 or (1e-3 <= self.temperature and np.isfinite(self.temperature))):
            raise EdgegenError(f"temperature {self.temperature} is invalid; use 0 (greedy) or a value >= 0.001")
        if self.top_k < 0:
            raise EdgegenError(f"top-k {self.top_k} is invalid; use 0 (off) or a positive count")
        if not 0 < self.top_p <= 1:
            raise EdgegenError(f"top-p {self.top_p} is invalid; use a value in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_finite(logits: np.ndarray, where: str) -> None:
    """NaN or inf logits are never turned into tokens (argmax of NaN is an arbitrary index)."""
    if not np.isfinite(logits).all():
        hint = "run with --no-assistant (use_assistant=False) or " if where == "assistant" else ""
        raise EdgegenError(f"the {where} graph produced NaN or inf logits, so no token can be chosen; its weights "
                           f"are broken: {hint}re-export the bundle from a healthy checkpoint")


def probabilities(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """Softmax of logits / T restricted to top-k and the top-p nucleus; float64 for stable ratios."""
    z = logits.astype(np.float64) / s.temperature
    if s.top_k and s.top_k < z.shape[-1]:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = cum - p[order] < s.top_p  # smallest prefix whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    return int(min(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"), len(p) - 1))


def accept_greedy(drafts: list[int], target_logits: np.ndarray) -> tuple[int, int]:
    """Longest prefix of drafts equal to the target's argmax; returns (accepted count, next token)."""
    choices = target_logits.argmax(-1)
    m = 0
    while m < len(drafts) and drafts[m] == int(choices[m]):
        m += 1
    return m, int(choices[m])


def accept_sampled(drafts: list[int], draft_probs: list[np.ndarray], target_logits: np.ndarray, s: Sampling,
                   rng: np.random.Generator) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al.): accept d_i with prob min(1, p/q), else resample from
    norm(max(p - q, 0)); if all k are accepted the bonus token comes from p_k."""
    for i, (d, q) in enumerate(zip(drafts, draft_probs, strict=True)):
        p = probabilities(target_logits[i], s)
        if rng.random() * q[d] < p[d]:  # u < p/q without dividing by a zero q
            continue
        residual = np.maximum(p - q, 0.0)
        if residual.sum() <= 0:  # p == q: any rejection is measure-zero; fall back to p
            residual = p
        return i, sample(residual, rng)
    return len(drafts), sample(probabilities(target_logits[len(drafts)], s), rng)

"""How many tokens to draft next round: fixed, or chosen online to maximise expected tokens per second.

With per-position acceptance rates a_1..a_K (conditional: a_i = P(draft i accepted | drafts < i were)),
a round with k drafts yields E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j tokens and costs k*c_draft +
c_verify(k). `AutoDraft` measures all of these as it goes (acceptance: running means from a prior of 0.5,
then exponential moving averages once those weigh more; costs: the minimum of recent timings), picks the k
with the best E(k)/cost(k) — k = 0 is plain decoding — and probes now and then: while drafting is off,
with one round of drafting, so it notices when the text becomes predictable again; while drafting fewer
than k_max, alternately with a plain step and a full-length round, so deeper positions' rates are learned.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class FixedDraft:
    def __init__(self, k: int):
        self.k = k

    def choose(self, cap: int) -> int:
        return min(self.k, cap)

    def update(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        pass

    def explain(self) -> dict:
        return {"mode": "fixed" if self.k else "off", "k": self.k}


@dataclass
class AutoDraft:
    k_max: int
    decay: float = 0.9  # EMA weight of the past, for acceptance rates
    probe_every: int = 16  # every this many rounds, try the option not taken (costs and rates drift);
    max_probe_every: int = 256  # while drafting is off, each failed probe doubles the gap up to this
    window: int = 8  # costs are the minimum of the last `window` timings: robust to one-off stalls
    prior_accept: float = 0.5  # optimistic start: drafting is tried before it is judged
    # Until the EMA's weight is the larger, a rate is the running mean of its observations with the prior
    # counted as this many: one failed round already says more than a 10% step away from 0.5 would.
    prior_weight: float = 2.0
    # The first round measures drafting with this many drafts, not k_max: with a useless drafter it wastes
    # a verify of 3 rows instead of k_max+1 (simulated at E2B costs over 48 tokens: 0.965x -> 0.979x of
    # plain; an accurate drafter loses ~1%). Deeper positions are learned by the full-length probes.
    first_k: int = 2
    accept: list[float] = field(default_factory=list)
    _seen: list[int] = field(default_factory=list)  # observations per position
    verify_s: dict[int, deque] = field(default_factory=dict)
    draft_s: dict[int, deque] = field(default_factory=dict)  # by k: a fused k-step round is cheaper than k steps
    _rounds: int = 0
    _gap: int = 0
    _probes: int = 0

    def __post_init__(self):
        self.accept = [self.prior_accept] * self.k_max
        self._seen = [0] * self.k_max
        self._gap = self.probe_every

    def expected_tokens(self, k: int) -> float:
        total, p = 1.0, 1.0
        for a in self.accept[:k]:
            p *= a
            total += p
        return total

    def _verify_cost(self, k: int) -> float:
        if k in self.verify_s:
            return min(self.verify_s[k])
        known = sorted(self.verify_s)
        if len(known) == 1:  # verify cost grows slowly with k on weight-bound hardware
            return min(self.verify_s[known[0]]) * (1 + 0.1 * abs(k - known[0]))
        k0, k1 = known[0], known[-1]
        c0, c1 = min(self.verify_s[k0]), min(self.verify_s[k1])
        return max(c0 + (c1 - c0) / (k1 - k0) * (k - k0), 1e-9)

    def _draft_cost(self, k: int) -> float:
        if k in self.draft_s:
            return min(self.draft_s[k])
        return k * max(min(v) / j for j, v in self.draft_s.items())  # conservative: the dearest step seen

    def _rate(self, k: int) -> float:
        """Expected tokens per second of a round with k drafts (k = 0: a plain step)."""
        return self.expected_tokens(k) / ((self._draft_cost(k) if k else 0.0) + self._verify_cost(k))

    def best(self, cap: int) -> int:
        best_k, best_rate = 0, self._rate(0)
        for k in range(1, cap + 1):
            rate = self._rate(k)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def choose(self, cap: int) -> int:
        cap = min(cap, self.k_max)
        if cap <= 0:
            return 0
        if not self.draft_s:
            return min(cap, self.first_k)  # measure drafting first
        if 0 not in self.verify_s:
            return 0  # then one plain step
        self._rounds += 1
        k = self.best(cap)
        if self._rounds >= self._gap:
            self._rounds = 0
            if k == 0:
                return 1
            # Drafting k < cap judges only positions <= k+1, so deeper rates would keep their prior forever:
            # probes alternate between a plain step (its cost drifts) and a full-length round.
            self._probes += 1
            return cap if k < cap and self._probes % 2 else 0
        return k

    def explain(self) -> dict:
        """What `auto` decided and the measurements behind it: a plain step's cost against the best
        drafting round's (draft + verify) per expected token."""
        out: dict = {"mode": "auto", "k": 0, "expected_tokens": None, "plain_step_ms": None, "round": None}
        if not self.draft_s or 0 not in self.verify_s:
            out["why"] = "not measured yet (the first rounds measure a drafting round and a plain step)"
            out["k"] = min(self.k_max, self.first_k) if not self.draft_s else 0
            return out
        best = self.best(self.k_max)
        k = best or max(range(1, self.k_max + 1), key=self._rate)  # drafting off: the best round it turned down
        draft_ms, verify_ms = 1e3 * self._draft_cost(k), 1e3 * self._verify_cost(k)
        expected = self.expected_tokens(k)
        plain_ms = 1e3 * self._verify_cost(0)
        out.update(k=best, expected_tokens=round(expected, 3), plain_step_ms=round(plain_ms, 3),
                   round={"k": k, "draft_ms": round(draft_ms, 3), "verify_ms": round(verify_ms, 3),
                          "ms_per_token": round((draft_ms + verify_ms) / expected, 3)})
        return out

    def update(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.verify_s.setdefault(k, deque(maxlen=self.window)).append(verify_s)
        if k:
            self.draft_s.setdefault(k, deque(maxlen=self.window)).append(draft_s)
            # Drafting that pays resets the probe gap; a probe that found nothing backs off.
            self._gap = self.probe_every if accepted else min(2 * self._gap, self.max_probe_every)
        for i in range(min(k, accepted + 1)):  # positions that were actually judged this round
            self._seen[i] += 1
            weight = max(1 - self.decay, 1 / (self._seen[i] + self.prior_weight))
            self.accept[i] += weight * ((1.0 if i < accepted else 0.0) - self.accept[i])


def describe(drafting: dict) -> str:
    """One sentence for a stats line: the draft-length decision and, for `auto`, the costs behind it."""
    mode = drafting.get("mode")
    if mode == "off":
        return "drafting off (plain decoding)"
    if mode == "fixed":
        return f"fixed {drafting['k']} drafts per round"
    if drafting.get("round") is None:
        return f"auto: {drafting.get('why', 'not measured yet')}"
    r, plain = drafting["round"], drafting["plain_step_ms"]
    costs = (f"a {r['k']}-draft round costs {r['draft_ms']:.2f} ms drafting + {r['verify_ms']:.2f} ms verify "
             f"for {drafting['expected_tokens']:.2f} expected tokens ({r['ms_per_token']:.2f} ms/token), "
             f"a plain step {plain:.2f} ms/token")
    if drafting["k"] == 0:
        return f"auto turned drafting off: {costs} (it probes again now and then)"
    return f"auto drafts {drafting['k']} per round: {costs}"

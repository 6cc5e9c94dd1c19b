"""`auto` draft length: it explains its decision with what it measured, and the decision follows the costs.

The policy is fed synthetic timings and acceptance (no model), so the expected choice is known exactly.
"""

from __future__ import annotations

import re

import pytest

from edgegen.runtime.adaptive import AutoDraft, FixedDraft, describe

MS = 1e-3
SENTENCE = re.compile(r"a (\d+)-draft round costs ([\d.]+) ms drafting \+ ([\d.]+) ms verify for ([\d.]+) expected "
                      r"tokens \(([\d.]+) ms/token\), a plain step ([\d.]+) ms/token")


def feed(policy: AutoDraft, plain_ms: float, draft_ms_per_token: float, verify_ms: float, accepted: int,
         rounds: int = 12) -> None:
    """`rounds` plain steps and `rounds` 4-draft rounds that each accepted `accepted` drafts."""
    for _ in range(rounds):
        policy.update(0, 0, 0.0, plain_ms * MS)
        policy.update(4, accepted, 4 * draft_ms_per_token * MS, verify_ms * MS)


def test_before_measuring_auto_says_so() -> None:
    d = AutoDraft(4).explain()
    assert d["mode"] == "auto" and d["round"] is None
    assert describe(d).startswith("auto: not measured yet")


@pytest.mark.parametrize(("plain_ms", "draft_ms", "verify_ms", "accepted", "k", "opening"), [
    (2.0, 1.0, 3.0, 0, 0, "auto turned drafting off: "),  # drafting costs more than it yields
    (10.0, 0.5, 11.0, 4, 4, "auto drafts 4 per round: "),  # cheap drafts, all accepted
])
def test_the_decision_follows_the_costs_and_names_them(plain_ms: float, draft_ms: float, verify_ms: float,
                                                       accepted: int, k: int, opening: str) -> None:
    policy = AutoDraft(4)
    feed(policy, plain_ms, draft_ms, verify_ms, accepted)
    d = policy.explain()
    assert d["k"] == k == policy.best(4)
    text = describe(d)
    assert text.startswith(opening)
    shown_k, draft, verify, expected, per_token, plain = (float(x) for x in SENTENCE.search(text).groups())
    assert float(plain) == plain_ms  # the plain step it measured
    if k:  # the round it runs is the one it measured
        assert (shown_k, draft, verify) == (k, 4 * draft_ms, verify_ms)
    assert (per_token < plain) == (k > 0)  # the reason, in the numbers shown
    assert per_token == pytest.approx((draft + verify) / expected, rel=0.01)  # shown values are rounded


def test_fixed_and_off_policies_describe_themselves() -> None:
    assert describe(FixedDraft(4).explain()) == "fixed 4 drafts per round"
    assert describe(FixedDraft(0).explain()) == "drafting off (plain decoding)"


def test_probes_learn_positions_deeper_than_the_rounds_it_drafts() -> None:
    """Drafting k=1 judges only position 1; if deeper drafts would all be accepted, a probe with a
    full-length round must find out (before: probes tried only a plain step, so k stayed at 1)."""
    policy = AutoDraft(4)
    policy.accept = [0.9, 0.1, 0.1, 0.1]  # a pessimistic start for positions 2-4

    def run(k: int) -> None:  # verify grows 1 ms per row, drafts cost 0.5 ms each, every draft accepted
        policy.update(k, k, 0.5 * k * MS, (10.0 + k) * MS)

    run(4)
    policy.accept = [0.9, 0.1, 0.1, 0.1]
    run(0)
    chosen = []
    for _ in range(200):
        k = policy.choose(4)
        chosen.append(k)
        run(k)
    assert chosen[0] == 1  # what the start says
    assert policy.best(4) == 4 and chosen[-20:].count(4) >= 19


def test_first_observations_move_the_rates_more_than_the_ema_would() -> None:
    """A drafter whose first rounds all fail is judged useless after one round (prior 0.5 counted as two
    observations: 0.5 -> 0.33), not after several (EMA alone: 0.5 -> 0.45); later observations use the EMA."""
    policy = AutoDraft(4)
    policy.update(4, 0, 4e-3, 20e-3)
    assert policy.accept[0] == pytest.approx(1 / 3) and policy.accept[1:] == [0.5] * 3
    policy.update(0, 0, 0.0, 10e-3)
    assert policy.best(4) == 0  # k=1: 1.33 expected tokens for 1 + 12.5 ms, against 10 ms a token
    for _ in range(20):
        policy.update(1, 1, 1e-3, 11e-3)
    before = policy.accept[0]
    policy.update(1, 0, 1e-3, 11e-3)
    assert policy.accept[0] == pytest.approx(before * policy.decay)  # past the warm-up: the EMA's step


def test_the_first_measuring_round_is_short() -> None:
    """Before anything is measured, `auto` drafts `first_k` (2), not k_max: with a useless drafter that round
    costs a 3-row verify instead of a 5-row one. Then a plain step, then the costs decide."""
    policy = AutoDraft(4)
    assert policy.choose(4) == 2 and policy.choose(1) == 1
    assert policy.explain()["k"] == 2
    policy.update(2, 0, 2e-3, 16e-3)
    assert policy.choose(4) == 0  # the plain step is measured next
    policy.update(0, 0, 0.0, 10e-3)
    assert policy.choose(4) == 0  # nothing accepted: k=1 gives 1.33 tokens for 1 ms + 13 ms (interpolated)


def test_a_verify_cost_that_grows_with_k_moe_turns_drafting_down() -> None:
    """On a mixture of experts each verified token routes to its own experts, so verifying k+1 tokens reads
    up to k+1 times the expert bytes of a decode step (benchmarks/moe_slices.py measures the ratio). `auto`
    must not assume the flat verify cost of a dense, weight-bound model: it uses the cost it measured at each
    k and interpolates between measured k. The same acceptance pays with a flat verify cost and not with one
    that grows with the tokens verified."""
    flat, moe = AutoDraft(4), AutoDraft(4)
    feed(flat, plain_ms=10.0, draft_ms_per_token=0.5, verify_ms=11.0, accepted=1)
    feed(moe, plain_ms=10.0, draft_ms_per_token=0.5, verify_ms=5 * 10.0, accepted=1)  # 5 tokens, 5x the experts
    assert flat.best(4) > 0
    assert moe.best(4) == 0
    # between the measured k = 0 and k = 4 the verify cost is interpolated, not extrapolated flat
    assert moe._verify_cost(2) == pytest.approx(30.0 * MS)

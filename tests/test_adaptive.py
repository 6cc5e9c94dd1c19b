"""`auto` draft length: it explains its decision with what it measured, and the decision follows the costs.

The policy is fed synthetic timings and acceptance (no model), so the expected choice is known exactly.
"""

from __future__ import annotations

import re

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


def test_expensive_drafting_turns_drafting_off_and_says_what_it_measured() -> None:
    policy = AutoDraft(4)
    feed(policy, plain_ms=2.0, draft_ms_per_token=1.0, verify_ms=3.0, accepted=0)
    d = policy.explain()
    assert d["k"] == 0 == policy.best(4)
    text = describe(d)
    assert text.startswith("auto turned drafting off: ")
    k, draft, verify, expected, per_token, plain = SENTENCE.search(text).groups()
    assert float(plain) == 2.0  # the plain step it measured
    assert float(per_token) > float(plain)  # the reason: the best drafting round costs more per token
    assert abs(float(per_token) - (float(draft) + float(verify)) / float(expected)) < 0.01


def test_cheap_accepted_drafting_keeps_drafting_and_says_why() -> None:
    policy = AutoDraft(4)
    feed(policy, plain_ms=10.0, draft_ms_per_token=0.5, verify_ms=11.0, accepted=4)
    d = policy.explain()
    assert d["k"] == 4 == policy.best(4)
    text = describe(d)
    assert text.startswith("auto drafts 4 per round: ")
    k, draft, verify, expected, per_token, plain = SENTENCE.search(text).groups()
    assert (int(k), float(draft), float(verify), float(plain)) == (4, 2.0, 11.0, 10.0)
    assert float(per_token) < float(plain)


def test_fixed_and_off_policies_describe_themselves() -> None:
    assert describe(FixedDraft(4).explain()) == "fixed 4 drafts per round"
    assert describe(FixedDraft(0).explain()) == "drafting off (plain decoding)"

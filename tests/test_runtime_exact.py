"""Greedy exactness: the runtime's speculative output is the target's plain greedy output, token for token.

The oracle is transformers: `target.generate` (plain) and `target.generate(assistant_model=...)` (HF's own
speculative loop). A random-weight drafter accepts almost nothing, so the accept/rollback paths are driven
by an *oracle drafter*: the real drafter graph still runs (the one-step `assistant` or the fused
`draft_round`), but its proposed tokens are replaced by the correct greedy continuation at some draft
positions and by wrong tokens at others.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from edgegen.export.loading import load_pair
from edgegen.runtime.generate import Generator
from edgegen.runtime.model import Bundle

CONFIGS = [("e2b-like", True), ("e2b-like", False), ("e4b-like", True), ("e4b-like", False),
           ("moe-like", False), ("31b-like", False)]  # 26B-A4B / 31B structure, published assistants
# (prompt length, max_new_tokens, draft_tokens): short prompts, prompts past the sliding window (16), and
# budgets that end inside a draft burst (e.g. 7 new tokens with 4 drafts: 1 + 4 + 1 + 1). k = 4 is the
# bundles' fused draft_round, other k run one assistant step per draft, "auto" chooses k each round.
CASES = [(1, 9, 4), (2, 7, 4), (4, 7, 4), (5, 1, 4), (3, 2, 4), (20, 12, 3), (33, 7, 4), (47, 16, 2),
         (60, 10, 4), (24, 14, "auto")]
FUSED_K = 4  # the test bundles' draft_round steps (the assistant's num_assistant_tokens)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: a second torch thread only adds spin-waiting on a busy 2-core machine
    (measured: HF generate 5-25x slower with 2 threads while other processes run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Oracle:
    """The HF pair and a loaded bundle for one configuration."""

    def __init__(self, pair, bundle_path: Path):
        self.target, self.assistant = pair.target, pair.assistant
        self.bundle = Bundle(bundle_path, threads=1)
        self.vocab = self.bundle.manifest.model.vocab_size
        self.eos_ids = set(self.bundle.manifest.generation["eos_token_ids"])

    def hf_greedy(self, ids: list[int], max_new_tokens: int, assisted: bool = False) -> list[int]:
        extra = {"assistant_model": self.assistant} if assisted else {}
        with torch.no_grad():
            out = self.target.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=max_new_tokens, do_sample=False, **extra)
        return out[0, len(ids):].tolist()

    def runtime_greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        return Generator(self.bundle).generate(ids, max_new_tokens, use_assistant=False).token_ids


@pytest.fixture(scope="module")
def oracle(pair_dir, bundle_dir) -> Callable[[str, bool], Oracle]:
    cache: dict[tuple[str, bool], Oracle] = {}

    def get(preset: str, centroid_head: bool) -> Oracle:
        if (preset, centroid_head) not in cache:
            target_dir, assistant_dir = pair_dir(preset, centroid_head)
            pair = load_pair(str(target_dir), str(assistant_dir))
            cache[preset, centroid_head] = Oracle(pair, bundle_dir(preset, centroid_head))
        return cache[preset, centroid_head]

    return get


def random_prompt(length: int, seed: int, vocab: int) -> list[int]:
    """BOS then seeded ids above the special tokens (so no prompt contains an EOS id)."""
    rng = np.random.default_rng(seed)
    return [2, *(int(x) for x in rng.integers(6, vocab, size=length - 1))]


def until_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids


@pytest.mark.parametrize(("preset", "centroid_head"), CONFIGS, ids=[f"{p}-c{int(c)}" for p, c in CONFIGS])
@pytest.mark.parametrize(("prompt_len", "max_new", "k"), CASES, ids=[f"p{p}-n{n}-k{k}" for p, n, k in CASES])
def test_speculative_greedy_equals_transformers(oracle, preset, centroid_head, prompt_len, max_new, k) -> None:
    o = oracle(preset, centroid_head)
    assert o.bundle.draft_round is not None and o.bundle.draft_round.steps == FUSED_K
    seed = 1000 * CONFIGS.index((preset, centroid_head)) + CASES.index((prompt_len, max_new, k))
    ids = random_prompt(prompt_len, seed, o.vocab)

    result = Generator(o.bundle, draft_tokens=k).generate(ids, max_new_tokens=max_new)
    plain = o.runtime_greedy(ids, max_new)
    hf_plain = o.hf_greedy(ids, max_new)
    hf_assisted = o.hf_greedy(ids, max_new, assisted=True)

    assert hf_assisted == hf_plain  # the oracle agrees with itself
    assert result.token_ids == hf_plain
    assert plain == hf_plain
    # HF stops after an EOS; without one it spends the whole budget.
    assert len(hf_plain) == max_new or hf_plain[-1] in o.eos_ids
    assert result.stop_reason == ("eos" if hf_plain[-1] in o.eos_ids else "max_new_tokens")
    if len(result.token_ids) >= 3:  # the speculative path really ran (a budget of 2 leaves no room to draft)
        assert result.stats.drafted > 0


def test_sliding_window_far_beyond_the_window(oracle) -> None:
    """A 200-token prompt (window 16) and 40 new tokens: sliding layers see only the last 16 of 240."""
    o = oracle("e2b-like", True)
    ids = random_prompt(200, 77, o.vocab)
    assert 200 > 10 * o.bundle.manifest.model.sliding_window
    result = Generator(o.bundle).generate(ids, max_new_tokens=40)
    assert result.token_ids == o.hf_greedy(ids, 40)
    assert result.stats.drafted > 0


LONG_CONTEXT, LONG_PROMPT = 1024, 700  # e2b-like: window 16, ring 256 slots; the prompt wraps it 2.7 times


@pytest.fixture(scope="module")
def long_oracle(pair_dir, bundle_dir) -> Callable[[str], Oracle]:
    """`long_oracle(kv_dtype)`: the e2b-like pair with a bundle of LONG_CONTEXT positions (ring buffers)."""
    cache: dict[str, Oracle] = {}

    def get(kv_dtype: str) -> Oracle:
        if kv_dtype not in cache:
            target_dir, assistant_dir = pair_dir("e2b-like", True)
            bundle = bundle_dir("e2b-like", True, max_context=LONG_CONTEXT, kv_dtype=kv_dtype)
            cache[kv_dtype] = Oracle(load_pair(str(target_dir), str(assistant_dir)), bundle)
        return cache[kv_dtype]

    return get


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16"])
def test_greedy_past_several_ring_wraps(long_oracle, kv_dtype: str) -> None:
    """Sliding layers on 256-slot rings (window 16), full layers on full-length buffers: a 700-token prompt
    (prefilled in calls of at most R - window = 240 rows) and 60 new tokens. Speculative decoding (the fused
    k = 4 round, k = 2 single steps) equals plain decoding bit for bit, with float32 and with float16 K/V;
    float32 equals transformers' greedy output."""
    o = long_oracle(kv_dtype)
    buffers = o.bundle.manifest.model.kv_buffers
    assert {b.length for b in buffers if b.kind == "sliding_attention"} == {256}
    assert {b.length for b in buffers if b.kind == "full_attention"} == {"max_context"}
    assert {b.dtype for b in buffers} == {{"fp32": "float32", "fp16": "float16"}[kv_dtype]}
    cache = o.bundle.new_cache()
    assert cache.max_rows == 256 - o.bundle.manifest.model.sliding_window
    ids = random_prompt(LONG_PROMPT, 4711, o.vocab)
    plain = o.runtime_greedy(ids, 60)
    for k in (FUSED_K, 2):
        result = Generator(o.bundle, draft_tokens=k).generate(ids, max_new_tokens=60)
        assert result.token_ids == plain, f"k={k}"
        assert result.stats.drafted > 0
    if kv_dtype == "fp32":
        assert plain == o.hf_greedy(ids, 60)


def test_oracle_drafter_past_several_ring_wraps(monkeypatch, long_oracle) -> None:
    """Accepted and rejected drafts (a 70%-correct drafter) while the rings wrap: the output is the plain
    greedy output, which is transformers'."""
    o = long_oracle("fp32")
    ids = random_prompt(LONG_PROMPT - 100, 4242, o.vocab)
    max_new, k = 120, FUSED_K
    reference = o.runtime_greedy(ids, max_new + k + 2)
    assert reference[:max_new] == o.hf_greedy(ids, max_new)
    expected = until_eos(reference[:max_new], o.eos_ids)
    result, _ = run_with_oracle(monkeypatch, o, ids, reference, max_new, k, correct_rate=0.7, seed=5)
    assert result.token_ids == expected
    assert 0 < result.stats.accepted < result.stats.drafted


# -- oracle drafter: the accept / rollback paths -------------------------------------------------------


class OracleDrafter:
    """Wraps `Assistant.step` and `DraftRound.run_round`: the graphs run, but each proposed token is the
    correct greedy continuation (from `sequence` = prompt + reference output) with probability
    `correct_rate`, else a wrong token."""

    def __init__(self, bundle: Bundle, sequence: list[int], prompt_len: int, correct_rate: float, seed: int):
        self.real_step = bundle.assistant.step
        self.real_round = bundle.draft_round.run_round if bundle.draft_round is not None else None
        self.sequence, self.prompt_len, self.correct_rate = sequence, prompt_len, correct_rate
        self.vocab = bundle.manifest.model.vocab_size
        self.rng = np.random.default_rng(seed)
        self.burst_at: int | None = None
        self.i = 0
        self.step_calls = self.round_calls = 0
        self.drafted_output_positions: list[int] = []

    def propose(self, processed: int, i: int) -> int:
        """The token for draft i of a burst at position P = processed: it stands for sequence[P + 1 + i]."""
        index = processed + 1 + i
        self.drafted_output_positions.append(index - self.prompt_len)
        correct = self.sequence[index] if index < len(self.sequence) else 0
        if self.rng.random() < self.correct_rate:
            return correct
        return (correct + 1 + int(self.rng.integers(self.vocab - 1))) % self.vocab

    def step(self, cache, token: int, hidden: np.ndarray):
        logits, _, projected = self.real_step(cache, token, hidden)
        self.step_calls += 1
        if cache.length != self.burst_at:  # a burst drafts at the constant position cache.length
            self.burst_at, self.i = cache.length, 0
        else:
            self.i += 1
        return logits, self.propose(cache.length, self.i), projected

    def run_round(self, cache, token: int, hidden: np.ndarray, *args, k: int | None = None):
        tokens, logits = self.real_round(cache, token, hidden, *args, k=k)
        self.round_calls += 1
        return [self.propose(cache.length, i) for i in range(len(tokens))], logits


def run_with_oracle(monkeypatch, o: Oracle, ids: list[int], reference: list[int], max_new: int, k: int,
                    correct_rate: float, seed: int = 0, eos_ids: set[int] | None = None):
    drafter = OracleDrafter(o.bundle, ids + reference, len(ids), correct_rate, seed)
    monkeypatch.setattr(o.bundle.assistant, "step", drafter.step)
    if o.bundle.draft_round is not None:
        monkeypatch.setattr(o.bundle.draft_round, "run_round", drafter.run_round)
    gen = Generator(o.bundle, draft_tokens=k)
    if eos_ids is not None:
        gen.eos_ids = eos_ids
    result = gen.generate(ids, max_new_tokens=max_new)
    monkeypatch.undo()
    if k <= FUSED_K:  # the fused round drafts any k up to its steps (greedy); single steps only beyond
        assert drafter.round_calls > 0 and drafter.step_calls == 0
    else:
        assert drafter.round_calls == 0 and drafter.step_calls > 0
    return result, drafter


ORACLE_CONFIGS = [("e2b-like", True), ("e4b-like", False)]


@pytest.mark.parametrize(("preset", "centroid_head"), ORACLE_CONFIGS, ids=[f"{p}-c{int(c)}" for p, c in ORACLE_CONFIGS])
@pytest.mark.parametrize(("prompt_len", "max_new", "k"), [(3, 23, 4), (25, 30, 3), (50, 17, 3), (8, 7, 4),
                                                        (40, 26, 2)])
def test_oracle_drafter_accepts_and_rolls_back(monkeypatch, oracle, preset, centroid_head, prompt_len, max_new,
                                               k) -> None:
    o = oracle(preset, centroid_head)
    ids = random_prompt(prompt_len, 500 + prompt_len, o.vocab)
    # The reference runs past the budget, so drafts beyond it would be "correct" and accepted if made.
    reference = o.runtime_greedy(ids, max_new + k + 2)
    assert reference[:max_new] == o.hf_greedy(ids, max_new)
    expected = until_eos(reference[:max_new], o.eos_ids)

    result, drafter = run_with_oracle(monkeypatch, o, ids, reference, max_new, k, correct_rate=0.7, seed=prompt_len)
    st = result.stats
    assert result.token_ids == expected
    if expected[-1] not in o.eos_ids:
        assert len(result.token_ids) == max_new  # nothing past the budget is emitted
    assert max(drafter.drafted_output_positions) < max_new  # nor even drafted
    assert st.accepted > 0
    assert sum(1 for n in st.accepted_hist if n) >= 2, st.accepted_hist
    assert st.tokens_per_target_call > 1
    assert st.new_tokens == len(expected)
    assert st.accepted <= st.drafted == sum(st.drafted_by_position)


def test_oracle_drafter_accept_lengths_cover_the_histogram(monkeypatch, oracle) -> None:
    """Over one long generation a 70%-correct drafter produces every accept length 0..k."""
    o = oracle("e2b-like", True)
    ids = random_prompt(12, 4242, o.vocab)
    k, max_new = 4, 120
    reference = o.runtime_greedy(ids, max_new + k + 2)
    expected = until_eos(reference[:max_new], o.eos_ids)
    result, _ = run_with_oracle(monkeypatch, o, ids, reference, max_new, k, correct_rate=0.7, seed=3)
    hist = result.stats.accepted_hist
    assert result.token_ids == expected
    assert len(hist) == k + 1 and sum(1 for n in hist if n) >= 3, hist
    assert hist[0] > 0 and hist[k] > 0
    assert result.stats.tokens_per_target_call > 1.5


def test_perfect_drafter_and_a_budget_inside_the_burst(monkeypatch, oracle) -> None:
    """7 tokens with k=4 and a drafter that is always right: 1 (prefill) + 4 drafts + bonus + 1."""
    o = oracle("e4b-like", True)
    ids = random_prompt(6, 99, o.vocab)
    reference = o.runtime_greedy(ids, 20)
    assert not set(reference[:7]) & o.eos_ids
    result, drafter = run_with_oracle(monkeypatch, o, ids, reference, 7, 4, correct_rate=1.0)
    assert result.token_ids == reference[:7]
    assert result.stats.accepted == result.stats.drafted == 4
    assert max(drafter.drafted_output_positions) < 7


@pytest.mark.parametrize("k", [FUSED_K, 3, FUSED_K + 1])
def test_eos_inside_accepted_drafts_ends_the_output(monkeypatch, oracle, k: int) -> None:
    """A token that first appears in the middle of an accepted burst is made an EOS id: the output must
    end exactly there, although the drafts after it were accepted too."""
    o = oracle("e2b-like", False)
    # With an always-right drafter, output index j is a non-final accepted draft iff j % (k+1) in 1..k-1.
    for seed in range(200, 240):
        ids = random_prompt(10, seed, o.vocab)
        reference = o.runtime_greedy(ids, 40)
        if set(reference) & o.eos_ids:
            continue
        firsts = {t: reference.index(t) for t in reference}
        mid = [(j, t) for t, j in firsts.items() if j % (k + 1) in range(1, k)]
        if mid:
            break
    else:
        pytest.fail("no prompt with a first occurrence inside a burst; widen the search")
    j, token = min(mid)
    result, _ = run_with_oracle(monkeypatch, o, ids, reference, 40, k, correct_rate=1.0,
                                eos_ids=o.eos_ids | {token})
    assert result.token_ids == reference[: j + 1]
    assert result.stop_reason == "eos"
    assert result.stats.new_tokens == j + 1
    assert result.stats.accepted_hist[-1] >= 1  # the round that reached the EOS accepted all k drafts


# -- chat: KV reuse across turns -----------------------------------------------------------------------


def test_chat_second_turn_reuses_kv_and_matches_a_fresh_generator(bundle_dir) -> None:
    path = bundle_dir("e2b-like", True)
    gen = Generator(path)
    first = [ev for ev in gen.chat("hello", max_new_tokens=10)]
    assert [ev.token_id for ev in first if ev.token_id >= 0]
    first_prompt = gen.tokenizer.encode(gen.tokenizer.render_chat(gen.messages[:1]), add_special_tokens=False)

    second = [ev for ev in gen.chat("more", max_new_tokens=10)]
    second_ids = [ev.token_id for ev in second if ev.token_id >= 0]
    stats = second[-1].stats
    assert [m["role"] for m in gen.messages] == ["user", "assistant", "user", "assistant"]
    # The prompt of turn 2 is the conversation so far, rendered with the generation prompt.
    prompt = gen.tokenizer.encode(gen.tokenizer.render_chat(gen.messages[:-1]), add_special_tokens=False)
    assert prompt[: len(first_prompt)] == first_prompt
    assert stats.prompt_tokens == len(prompt)
    assert len(first_prompt) - 1 <= stats.reused_tokens < len(prompt)

    fresh = Generator(path).generate(prompt, max_new_tokens=10)
    assert second_ids == fresh.token_ids
    assert fresh.stats.reused_tokens == 0

"""The token loop: prompt ids in, one `Token` per generated id out. No text here (see text.py).

One round (docs/architecture.md, "One round"): the cache holds P processed positions and `pending` (the
last accepted token) is not yet in it.
  draft   k assistant steps at the constant position P, from (pending, hidden of position P-1)
  verify  the target runs [pending, d1..dk] at P..P+k
  accept  the longest agreeing prefix (greedy) or the speculative-sampling rule; one extra token
  commit  trim the cache to P+m+1; everything past it is overwritten later, never copied
Plain decoding is the same round with k = 0. The loop stops at the bundle's EOS ids (for Gemma 4 `<eos>`
and the end of turn `<turn|>`), the token budget or the context, and says which on the last token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgegen.runtime.adaptive import AutoDraft, FixedDraft
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.model import NO_SOFT_TOKENS, Bundle
from edgegen.runtime.prompt import SoftTokens, check_soft, identity, soft_rows
from edgegen.runtime.sampling import (
    Sampling,
    accept_greedy,
    accept_sampled,
    check_finite,
    probabilities,
    sample,
)


@dataclass
class Stats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt positions whose KV came from an earlier turn
    new_tokens: int = 0
    target_calls: int = 0  # after prefill
    drafted: int = 0
    accepted: int = 0
    accepted_hist: list[int] = field(default_factory=list)  # rounds that accepted exactly i drafts
    accepted_by_position: list[int] = field(default_factory=list)  # drafts accepted at draft position i
    drafted_by_position: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    time_to_first_token_s: float = 0.0
    elapsed_s: float = 0.0
    target_s: float = 0.0
    draft_s: float = 0.0
    drafting: dict = field(default_factory=dict)  # the draft-length policy's decision and what it measured
    image_encode_s: float = 0.0  # the vision graph's time for this prompt's new images (before the prefill)
    audio_encode_s: float = 0.0  # features + audio graph for this prompt's new clips (before the prefill)

    @property
    def tokens_per_target_call(self) -> float:
        return (self.new_tokens - 1) / self.target_calls if self.target_calls else 0.0

    @property
    def tokens_per_second(self) -> float:
        decode = self.elapsed_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / decode if decode > 0 and self.new_tokens > 1 else 0.0

    def record_round(self, k: int, m: int) -> None:
        self.accepted_hist.extend([0] * (k + 1 - len(self.accepted_hist)))
        for lst in (self.accepted_by_position, self.drafted_by_position):
            lst.extend([0] * (k - len(lst)))
        self.accepted_hist[m] += 1
        for i in range(k):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += int(i < m)
        self.target_calls += 1
        self.drafted += k
        self.accepted += m

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["tokens_per_target_call"] = round(self.tokens_per_target_call, 4)
        d["tokens_per_second"] = round(self.tokens_per_second, 3)
        d["acceptance_by_position"] = [
            round(a / n, 4) if n else None
            for a, n in zip(self.accepted_by_position, self.drafted_by_position, strict=True)
        ]
        return d


@dataclass
class Token:
    """One generated token. `stats` is the generation's (one object, updated as the loop runs)."""

    token_id: int
    drafted: bool  # an assistant draft the target accepted; False: the target's own choice
    stats: Stats
    stop_reason: str | None = None  # on the last token only: eos | max_new_tokens | context


class TokenLoop:
    """The draft/verify loop over one bundle. The `Bundle` (sessions) may be shared by several loops across
    threads; a loop owns one KV cache (and the ids in it), so use one per thread."""

    def __init__(self, bundle: str | Path | Bundle, threads: int | None = None,
                 draft_tokens: int | str | None = "auto", ep: str = "cpu"):
        """ep: the execution provider (cpu, qnn, webgpu, openvino, auto) when `bundle` is a path; a Bundle
        object keeps the EP it was loaded with."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle, threads=threads, ep=ep)
        m = self.bundle.manifest
        self.eos_ids = set(m.generation.get("eos_token_ids") or [])
        self.max_draft_tokens = int(m.generation.get("draft_tokens") or 4)
        self.draft_tokens = draft_tokens or "auto"  # an int, or "auto": chosen each round (see adaptive.py)
        self._auto: AutoDraft | None = None
        self.cache = self.bundle.new_cache()
        # What each cached position holds, in order: its token id, or (key, i) for a soft token (prompt.py)
        self.processed: list = []
        self._guard = threading.Lock()
        self._owner: int | None = None  # the thread generating now (it may nest streams; others may not)
        self._depth = 0

    def stream_ids(self, prompt_ids: list[int], max_new_tokens: int = 128, sampling: Sampling | None = None,
                   use_assistant: bool = True, draft_tokens: int | str | None = None,
                   soft: tuple[SoftTokens, ...] | list[SoftTokens] = ()) -> Iterator[Token]:
        """Yield one Token per generated id; the last one carries the stop reason. Reuses the cached K/V
        of a shared prompt prefix (an earlier chat turn). soft: embeddings that replace placeholder ids of
        the prompt (images, audio: runtime/prompt.py)."""
        self._claim()
        try:
            yield from self._generate(prompt_ids, max_new_tokens, sampling or Sampling(), use_assistant, draft_tokens,
                                      tuple(soft))
        finally:
            self._release()

    def reset(self) -> None:
        self.cache.reset()
        self.processed.clear()

    # -- the loop ----------------------------------------------------------------------------------
    def _generate(self, prompt_ids: list[int], max_new_tokens: int, s: Sampling, use_assistant: bool,
                  draft_tokens: int | str | None, soft: tuple[SoftTokens, ...] = ()) -> Iterator[Token]:
        policy = self._policy(draft_tokens, s, use_assistant)
        self._check_request(prompt_ids, max_new_tokens)
        if soft:
            if not self.bundle.target.takes_soft_tokens:
                raise EdgegenError(NO_SOFT_TOKENS)  # before anything runs
            soft = tuple(check_soft(soft, len(prompt_ids), self.bundle.manifest.model.hidden_size))
        rng = np.random.default_rng(s.seed)
        stats = Stats(prompt_tokens=len(prompt_ids), drafting=policy.explain())
        t0 = time.perf_counter()
        first, h = self._prefill(prompt_ids, s, rng, stats, soft)
        out = [(first, False)]  # what the last round emits: accepted drafts, then the target's own token
        while True:
            for token, drafted in out:
                stats.new_tokens += 1
                stats.elapsed_s = time.perf_counter() - t0
                if stats.new_tokens == 1:
                    stats.time_to_first_token_s = stats.elapsed_s
                stop = self._stop_reason(token, drafted, stats.new_tokens, max_new_tokens)
                yield Token(token, drafted, stats, stop)
                if stop:
                    return
            pending = out[-1][0]
            # Never draft past the token budget or the context.
            room = min(max_new_tokens - stats.new_tokens - 1, self.cache.max_context - self.cache.length - 2)
            k = policy.choose(max(room, 0)) if self.bundle.has_assistant else 0
            accepted, bonus, h = self._round(pending, h, k, s, rng, stats, policy)
            out = [*((d, True) for d in accepted), (bonus, False)]

    def _prefill(self, prompt_ids: list[int], s: Sampling, rng: np.random.Generator,
                 stats: Stats, soft: tuple[SoftTokens, ...] = ()) -> tuple[int, np.ndarray]:
        """Run the prompt positions the cache does not already hold; the first token and its hidden state."""
        t0 = time.perf_counter()
        held = identity(prompt_ids, soft) if soft else prompt_ids
        # A ring buffer may no longer hold the window before a long-rewritten prefix: then start over.
        reuse = self.cache.reusable(_common_prefix(self.processed, held[:-1]))
        self.cache.trim(reuse)
        del self.processed[reuse:]
        rows = soft_rows(soft, reuse, len(prompt_ids)) if soft else None
        pad_id = int(self.bundle.manifest.generation.get("pad_token_id") or 0)
        logits, hidden = self.bundle.target.forward(self.cache, prompt_ids[reuse:], soft=rows, pad_id=pad_id)
        self.processed.extend(held[reuse:])
        stats.reused_tokens = reuse
        stats.prefill_s = time.perf_counter() - t0
        stats.target_s += stats.prefill_s
        check_finite(logits, "target")
        first = int(logits[-1].argmax()) if s.greedy else sample(probabilities(logits[-1], s), rng)
        return first, hidden[-1]

    def _round(self, pending: int, h: np.ndarray, k: int, s: Sampling, rng: np.random.Generator, stats: Stats,
               policy: FixedDraft | AutoDraft) -> tuple[list[int], int, np.ndarray]:
        """Draft k, verify, accept m, commit: the accepted drafts, the target's own next token (the bonus or
        the correction) and the hidden state the next round drafts from."""
        td = time.perf_counter()
        drafts, qs = self._draft(k, pending, h, s, rng)
        tv = time.perf_counter()
        base = self.cache.length
        logits, hidden = self.bundle.target.forward(self.cache, [pending, *drafts], logits_to_keep=k + 1)
        verify_s = time.perf_counter() - tv
        check_finite(logits, "target")
        m, bonus = accept_greedy(drafts, logits) if s.greedy else accept_sampled(drafts, qs, logits, s, rng)
        self.cache.trim(base + m + 1)  # rows past it hold rejected drafts; later calls overwrite them
        self.processed.extend([pending, *drafts[:m]])
        stats.draft_s += tv - td
        stats.target_s += verify_s
        stats.record_round(k, m)
        policy.update(k, m, tv - td, verify_s)
        stats.drafting = policy.explain()
        return drafts[:m], bonus, hidden[m]

    def _draft(self, k: int, token: int, hidden: np.ndarray, s: Sampling, rng: np.random.Generator):
        """k draft tokens (and, when sampling, the drafter's distributions q). One session call when the
        bundle's fused round has at least k steps and the sampling rule fits in it (its first k drafts are
        the ones k steps would give); else k step calls."""
        if not k:
            return [], []
        fused = self.bundle.draft_round
        if fused is not None and k <= fused.steps and (s.greedy or fused.samples and s.top_k == 0 and s.top_p == 1.0):
            if s.greedy:
                tokens, logits = fused.run_round(self.cache, token, hidden, k=k)
                check_finite(logits, "assistant")
                return tokens, []
            u = rng.random((fused.steps, fused.vocab))
            tokens, logits = fused.run_round(self.cache, token, hidden, 1.0 / s.temperature,
                                             -np.log(-np.log(np.clip(u, 1e-20, 1.0 - 1e-7))), k=k)
            check_finite(logits, "assistant")
            return tokens, [probabilities(row, s) for row in logits]
        drafts, qs = [], []
        for _ in range(k):
            logits, greedy_next, hidden = self.bundle.assistant.step(self.cache, token, hidden)
            check_finite(logits, "assistant")
            if s.greedy:
                token = greedy_next
            else:
                q = probabilities(logits, s)
                qs.append(q)
                token = sample(q, rng)
            drafts.append(token)
        return drafts, qs

    def _stop_reason(self, token: int, drafted: bool, emitted: int, max_new_tokens: int) -> str | None:
        """Why generation ends after `token`, or None. A target token also ends it when the cache has no
        room for it (an accepted draft's position is already in the cache)."""
        if token in self.eos_ids:
            return "eos"
        if emitted >= max_new_tokens:
            return "max_new_tokens"
        if not drafted and self.cache.length + 1 >= self.cache.max_context:
            return "context"
        return None

    # -- checks ----------------------------------------------------------------------------------------
    def _policy(self, draft_tokens: int | str | None, s: Sampling, use_assistant: bool) -> FixedDraft | AutoDraft:
        if not use_assistant:
            return FixedDraft(0)
        choice = self.draft_tokens if draft_tokens is None else draft_tokens
        if choice == "auto":
            if self._auto is None:  # learned costs and acceptance carry over between calls
                self._auto = AutoDraft(self.max_draft_tokens)
            if not s.greedy and s.seed is not None:
                # Auto k follows measured timings, and the random draws per round depend on k: a seeded
                # sampling run uses the bundle's fixed draft length so that it is reproducible.
                return FixedDraft(self.max_draft_tokens)
            return self._auto
        if isinstance(choice, bool) or not str(choice).isdigit():
            raise EdgegenError(f"draft tokens {choice!r} is invalid; use 'auto' or a count >= 0")
        if int(choice) and not self.bundle.has_assistant:
            raise EdgegenError("this bundle has no assistant graph; run with --no-assistant")
        return FixedDraft(int(choice))

    def _check_request(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if not prompt_ids:
            raise EdgegenError("the prompt is empty; give at least one token")
        if max_new_tokens < 1:
            raise EdgegenError(f"max new tokens {max_new_tokens} is invalid; use 1 or more")
        vocab = self.bundle.manifest.model.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise EdgegenError(f"prompt token ids must be in [0, {vocab})")
        cap = self.cache.max_context
        if len(prompt_ids) >= cap:
            raise EdgegenError(f"the prompt has {len(prompt_ids)} tokens; this bundle holds {cap} (prompt + output)")

    # -- one thread at a time -------------------------------------------------------------------------
    def _claim(self) -> None:
        """The cache belongs to one thread at a time: a second thread is refused instead of silently
        interleaving rounds in the same KV buffers."""
        me = threading.get_ident()
        with self._guard:
            if self._owner not in (None, me):
                raise EdgegenError("this Generator is already generating in another thread; give each thread "
                                   "its own Generator (they can share one Bundle)")
            self._owner, self._depth = me, self._depth + 1

    def _release(self) -> None:
        with self._guard:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

"""The draft/verify loop and the Python API built on it.

One round (docs/architecture.md, "One round"): the cache holds P processed positions and `pending` (the
last accepted token) is not yet in it.
  draft   k assistant steps at the constant position P, from (pending, hidden of position P-1)
  verify  the target runs [pending, d1..dk] at P..P+k
  accept  the longest agreeing prefix (greedy) or the speculative-sampling rule; one extra token
  commit  trim the cache to P+m+1; everything past it is overwritten later, never copied
Plain decoding is the same round with k = 0. `stream` yields one event per emitted token; `generate`
and `chat` are built from it.

Text: `generate` and `stream` continue a raw prompt; `chat` renders the conversation with the bundle's chat
template (system turn, tool declarations, `enable_thinking`). Generation stops at the bundle's EOS ids (the
target's generation config: for Gemma 4 `<eos>` and the end of turn `<turn|>`) or a stop string. Events and
results keep the model's thinking (its `<|channel>thought ... <channel|>` text) apart from the answer:
`thinking` and `text`. Stop strings apply to the answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgegen.runtime.adaptive import AutoDraft, FixedDraft
from edgegen.runtime.detokenize import TextStream
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.model import Bundle
from edgegen.runtime.sampling import (
    Sampling,
    accept_greedy,
    accept_sampled,
    check_finite,
    probabilities,
    sample,
)
from edgegen.runtime.tokenizer import TextTokenizer


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
class Event:
    token_id: int  # -1: no new token, text held back until the end (an unfinished character, a stop prefix)
    text: str  # the answer text this token added (may be empty while a character or stop string is open)
    stats: Stats
    thinking: str = ""  # the thinking text this token added


@dataclass
class Result:
    text: str  # the answer
    token_ids: list[int]
    stats: Stats
    stop_reason: str  # eos | stop_string | max_new_tokens | context
    thinking: str = ""


class Generator:
    """Generation over one bundle. The `Bundle` (sessions) may be shared by several Generators across
    threads; a Generator owns one KV cache and one conversation, so use one per thread."""

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
        self._tokenizer: TextTokenizer | None = None
        self.cache = self.bundle.new_cache()
        self.processed: list[int] = []  # token ids whose K/V are in the cache, in order
        self.messages: list[dict] = []
        self.last_stop_reason: str | None = None  # of the last text stream that ran to its end
        self._guard = threading.Lock()
        self._owner: int | None = None  # the thread generating now (it may nest streams; others may not)
        self._depth = 0

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.bundle.path, self.bundle.manifest.tokenizer)
        return self._tokenizer

    def _policy(self, draft_tokens: int | str | None) -> FixedDraft | AutoDraft:
        choice = self.draft_tokens if draft_tokens is None else draft_tokens
        if choice == "auto":
            if self._auto is None:  # learned costs and acceptance carry over between calls
                self._auto = AutoDraft(self.max_draft_tokens)
            return self._auto
        if isinstance(choice, bool) or not str(choice).isdigit():
            raise EdgegenError(f"draft tokens {choice!r} is invalid; use 'auto' or a count >= 0")
        return FixedDraft(int(choice))

    # -- one thread at a time -------------------------------------------------------------------------
    def _claim(self) -> None:
        """The cache and conversation belong to one thread at a time: a second thread is refused instead
        of silently interleaving rounds in the same KV buffers."""
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

    # -- the loop ----------------------------------------------------------------------------------
    def stream_ids(self, prompt_ids: list[int], max_new_tokens: int = 128, sampling: Sampling | None = None,
                   use_assistant: bool = True, draft_tokens: int | str | None = None) -> Iterator[Event]:
        """Yield one Event per generated token (no text: `stream` adds it, and stop strings, which need
        text). Reuses cached K/V of a shared prompt prefix."""
        self._claim()
        try:
            yield from self._rounds(prompt_ids, max_new_tokens, sampling, use_assistant, draft_tokens)
        finally:
            self._release()

    def _rounds(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling | None, use_assistant: bool,
                draft_tokens: int | str | None) -> Iterator[Event]:
        s = sampling or Sampling()
        policy = self._policy(draft_tokens) if use_assistant else FixedDraft(0)
        if isinstance(policy, AutoDraft) and not s.greedy and s.seed is not None:
            # Auto k follows measured timings, and the random draws per round depend on k: a seeded
            # sampling run uses the bundle's fixed draft length so that it is reproducible.
            policy = FixedDraft(self.max_draft_tokens)
        if use_assistant and isinstance(policy, FixedDraft) and policy.k and self.bundle.assistant is None:
            raise EdgegenError("this bundle has no assistant graph; run with --no-assistant")
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
        rng = np.random.default_rng(s.seed)
        stats = Stats(prompt_tokens=len(prompt_ids), drafting=policy.explain())
        target, assistant = self.bundle.target, self.bundle.assistant
        t0 = time.perf_counter()

        # Prefill what the cache does not already hold (earlier turns of a conversation).
        reuse = _common_prefix(self.processed, prompt_ids[:-1])
        self.cache.trim(reuse)
        del self.processed[reuse:]
        stats.reused_tokens = reuse
        logits, hidden = target.forward(self.cache, prompt_ids[reuse:])
        self.processed.extend(prompt_ids[reuse:])
        stats.prefill_s = time.perf_counter() - t0
        check_finite(logits, "target")
        pending = int(logits[-1].argmax()) if s.greedy else sample(probabilities(logits[-1], s), rng)
        h = hidden[-1]
        stats.target_s += stats.prefill_s
        emitted = 0
        while True:
            emitted += 1
            stats.new_tokens = emitted
            if emitted == 1:
                stats.time_to_first_token_s = time.perf_counter() - t0
            stats.elapsed_s = time.perf_counter() - t0
            yield Event(pending, "", stats)
            if pending in self.eos_ids or emitted >= max_new_tokens or self.cache.length + 1 >= cap:
                return
            # Never draft past the token budget or the context.
            k = policy.choose(max(min(max_new_tokens - emitted - 1, cap - self.cache.length - 2), 0))
            if assistant is None:
                k = 0
            td = time.perf_counter()
            drafts, qs = self._draft(k, pending, h, s, rng)
            tv = time.perf_counter()
            stats.draft_s += tv - td
            base = self.cache.length
            logits, hidden = target.forward(self.cache, [pending, *drafts], logits_to_keep=k + 1)
            verify_s = time.perf_counter() - tv
            stats.target_s += verify_s
            check_finite(logits, "target")
            if s.greedy:
                m, nxt = accept_greedy(drafts, logits)
            else:
                m, nxt = accept_sampled(drafts, qs, logits, s, rng)
            stats.record_round(k, m)
            policy.update(k, m, tv - td, verify_s)
            stats.drafting = policy.explain()
            self.cache.trim(base + m + 1)
            self.processed.extend([pending, *drafts[:m]])
            h = hidden[m]
            for d in drafts[:m]:
                emitted += 1
                stats.new_tokens = emitted
                stats.elapsed_s = time.perf_counter() - t0
                yield Event(d, "", stats)
                if d in self.eos_ids or emitted >= max_new_tokens:
                    return
            pending = nxt

    def _draft(self, k: int, token: int, hidden: np.ndarray, s: Sampling, rng: np.random.Generator):
        """k draft tokens (and, when sampling, the drafter's distributions q). One session call when the
        bundle's fused round has exactly k steps and the sampling rule fits in it; else k step calls."""
        if not k:
            return [], []
        fused = self.bundle.draft_round
        if fused is not None and fused.steps == k and s.top_k == 0 and s.top_p == 1.0:
            if s.greedy:
                tokens, logits = fused.run_round(self.cache, token, hidden)
                check_finite(logits, "assistant")
                return tokens, []
            u = rng.random((k, fused.vocab))
            tokens, logits = fused.run_round(self.cache, token, hidden, 1.0 / s.temperature,
                                             -np.log(-np.log(np.clip(u, 1e-20, 1.0 - 1e-7))))
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

    def stream(self, prompt: str | list[int], max_new_tokens: int = 128, sampling: Sampling | None = None,
               use_assistant: bool = True, draft_tokens: int | str | None = None,
               stop_strings: tuple[str, ...] = ()) -> Iterator[Event]:
        """Like `stream_ids`, with text: each event carries the answer and thinking text its token added."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self._with_text(self.stream_ids(ids, max_new_tokens, sampling, use_assistant, draft_tokens),
                               stop_strings, max_new_tokens)

    def _with_text(self, events: Iterator[Event], stop_strings: tuple[str, ...],
                   max_new_tokens: int) -> Iterator[Event]:
        text_stream = TextStream(self.tokenizer)
        stop_strings = tuple(x for x in stop_strings if x)  # an empty stop string would match everywhere
        longest = max((len(x) for x in stop_strings), default=0)
        answer, shown = "", 0  # the answer so far; how much of it was yielded
        last_id, count = None, 0
        for ev in events:
            last_id, count = ev.token_id, count + 1
            thinking, piece = text_stream.push(ev.token_id)
            answer += piece
            if stop_strings and piece:
                start = max(len(answer) - len(piece) - longest + 1, 0)  # only where a new match can be
                hits = [i for i in (answer.find(x, start) for x in stop_strings) if i >= 0]
                if hits:
                    cut = max(min(hits), shown)
                    yield Event(ev.token_id, answer[shown:cut], ev.stats, thinking)
                    self.last_stop_reason = "stop_string"
                    events.close()
                    return
            safe = max(len(answer) - longest + 1, shown) if stop_strings else len(answer)  # a stop's prefix waits
            yield Event(ev.token_id, answer[shown:safe], ev.stats, thinking)
            shown = safe
        thinking, piece = text_stream.finish()
        answer += piece
        if thinking or len(answer) > shown:
            yield Event(-1, answer[shown:], ev.stats, thinking)  # held-back text (no new token)
        self.last_stop_reason = self._stop_reason(last_id, count, max_new_tokens)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, sampling: Sampling | None = None,
                 use_assistant: bool = True, draft_tokens: int | str | None = None,
                 stop_strings: tuple[str, ...] = ()) -> Result:
        """Blocking generation, built from `stream`. Token-id prompts work without a tokenizer (empty text)."""
        if isinstance(prompt, list) and not _has_tokenizer(self):
            if stop_strings:
                raise EdgegenError("stop strings need the bundle's tokenizer, and this bundle has none")
            events = list(self.stream_ids(prompt, max_new_tokens, sampling, use_assistant, draft_tokens))
            ids = [e.token_id for e in events]
            return Result("", ids, events[-1].stats, self._stop_reason(ids[-1], len(ids), max_new_tokens))
        return self.collect(self.stream(prompt, max_new_tokens, sampling, use_assistant, draft_tokens, stop_strings))

    def _stop_reason(self, last_id: int | None, emitted: int, max_new_tokens: int) -> str:
        """Why a stream that ran to its end stopped (a stop string is decided where it matches)."""
        if last_id in self.eos_ids:
            return "eos"
        return "max_new_tokens" if emitted >= max_new_tokens else "context"

    def collect(self, events: Iterator[Event]) -> Result:
        """The Result of a `stream` or `chat`, consumed to its end."""
        events = list(events)
        ids = [e.token_id for e in events if e.token_id >= 0]
        return Result("".join(e.text for e in events), ids, events[-1].stats, self.last_stop_reason,
                      "".join(e.thinking for e in events))

    # -- chat ----------------------------------------------------------------------------------------
    def chat(self, user_message: str, max_new_tokens: int = 256, sampling: Sampling | None = None,
             use_assistant: bool = True, draft_tokens: int | str | None = None, stop_strings: tuple[str, ...] = (),
             *, system: str | None = None, enable_thinking: bool = False,
             tools: list[dict] | None = None) -> Iterator[Event]:
        """One conversation turn, streamed. Earlier turns' K/V are reused, not prefilled again.

        system: the conversation's system instruction (given again, it replaces the earlier one; None keeps
        it). enable_thinking: ask the model to reason first (events carry it as `thinking`). tools: function
        declarations the model may call (JSON schema dicts); a call comes back in the answer text as the
        template's markup, e.g. `<|tool_call>call:name{...}<tool_call|>`. The conversation keeps answers
        only: the template drops earlier turns' thinking.
        """
        if system is not None:
            if self.messages and self.messages[0]["role"] in ("system", "developer"):
                self.messages[0] = {"role": self.messages[0]["role"], "content": system}
            else:
                self.messages.insert(0, {"role": "system", "content": system})
        self.messages.append({"role": "user", "content": user_message})
        try:
            text = self.tokenizer.render_chat(self.messages, add_generation_prompt=True, tools=tools,
                                              enable_thinking=enable_thinking)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        except EdgegenError:
            self.messages.pop()  # a turn that never ran is not part of the conversation
            raise
        reply = []
        try:
            for ev in self._with_text(self.stream_ids(ids, max_new_tokens, sampling, use_assistant, draft_tokens),
                                      stop_strings, max_new_tokens):
                reply.append(ev.text)
                yield ev
        finally:  # also when the caller stops early: the conversation keeps what was said
            self.messages.append({"role": "assistant", "content": "".join(reply)})

    def reset(self) -> None:
        self.cache.reset()
        self.processed.clear()
        self.messages.clear()


def _has_tokenizer(gen: Generator) -> bool:
    return "tokenizer.json" in gen.bundle.manifest.tokenizer.get("files", [])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

"""The three pieces of generation and what each reports: the token loop's drafted flags and stop reasons,
the text stream's stop strings and held-back text, and stop strings through `stream`, `generate` and `chat`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgegen.runtime.generate import Generator
from edgegen.runtime.loop import Stats, Token
from edgegen.runtime.text import text_events
from edgegen.runtime.tokenizer import TextTokenizer

SPEC = {"files": ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"],
        "chat_template": "chat_template.jinja"}
PROMPT = [2, 105, 40, 41, 42, 43]  # the random model writes varied tokens after it


# -- the token loop -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen(bundle_dir) -> Generator:
    return Generator(bundle_dir("e2b-like"), threads=1, draft_tokens=4)


def reference_drafter(monkeypatch, gen: Generator, reference: list[int], prompt_len: int) -> None:
    """Drafts that continue `reference` (plain greedy output), with one wrong draft every third round, so
    that rounds accept all, some or none of their drafts."""
    rounds = [0]

    def draft(k, token, hidden, s, rng):
        start = gen.cache.length - prompt_len + 1  # output index of the first draft
        drafts = list(reference[start:start + k])
        rounds[0] += 1
        if drafts and rounds[0] % 3 == 0:
            wrong = rounds[0] % len(drafts)
            drafts[wrong] = (drafts[wrong] + 1) % gen.bundle.manifest.model.vocab_size
        return drafts, []

    monkeypatch.setattr(gen, "_draft", draft)


def test_drafted_flags_match_the_stats(monkeypatch, gen: Generator) -> None:
    monkeypatch.setattr(gen, "eos_ids", set())  # the budget ends this generation
    new = 40
    gen.reset()
    reference = gen.generate(PROMPT, new, use_assistant=False).token_ids
    reference_drafter(monkeypatch, gen, reference, len(PROMPT))
    gen.reset()
    tokens = list(gen.stream_ids(PROMPT, new))
    stats = tokens[-1].stats
    assert [t.token_id for t in tokens] == reference
    assert [t.stop_reason for t in tokens] == [None] * (new - 1) + ["max_new_tokens"]
    assert 0 < stats.accepted < stats.drafted
    assert sum(t.drafted for t in tokens) == stats.accepted
    # Each round emits its accepted drafts, then the target's own token: the runs of drafted tokens between
    # the target's tokens are the rounds' accept counts.
    own = [i for i, t in enumerate(tokens) if not t.drafted]
    assert own[0] == 0 and own[-1] == new - 1 and len(own) == 1 + stats.target_calls
    runs = [b - a - 1 for a, b in zip(own, own[1:], strict=False)]
    assert [runs.count(m) for m in range(len(stats.accepted_hist))] == stats.accepted_hist
    assert max(runs) == 4  # some rounds accepted all their drafts


def test_the_last_token_says_why_the_loop_stopped(monkeypatch, gen: Generator) -> None:
    gen.reset()
    free = gen.generate(PROMPT, 12, use_assistant=False)
    assert free.stop_reason == "max_new_tokens" or free.token_ids[-1] in gen.eos_ids
    j = next(i for i, t in enumerate(free.token_ids) if i >= 3 and t not in free.token_ids[:i])
    monkeypatch.setattr(gen, "eos_ids", {free.token_ids[j]})
    for use_assistant in (False, True):
        gen.reset()
        tokens = list(gen.stream_ids(PROMPT, 12, use_assistant=use_assistant))
        assert [t.token_id for t in tokens] == free.token_ids[: j + 1]
        assert [t.stop_reason for t in tokens] == [None] * j + ["eos"]

    monkeypatch.setattr(gen, "eos_ids", set())
    cap = gen.cache.max_context
    long_prompt = [(7 * i) % 200 + 3 for i in range(cap - 3)]
    gen.reset()
    tokens = list(gen.stream_ids(long_prompt, 50))
    assert len(tokens) == 3 and tokens[-1].stop_reason == "context"  # the cache holds cap - 1 positions


# -- the text stream ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(gemma4_tokenizer_dir: Path) -> TextTokenizer:
    return TextTokenizer(gemma4_tokenizer_dir, SPEC)


def scripted(ids: list[int], reason: str, closed: list[bool]):
    """A token source: `ids`, the last one with `reason`; records whether it was closed before its end."""
    stats = Stats()
    try:
        for i, t in enumerate(ids):
            stats.new_tokens = i + 1
            yield Token(t, i % 2 == 1, stats, reason if i == len(ids) - 1 else None)
    except GeneratorExit:
        closed.append(True)
        raise


def test_text_without_stop_strings_is_the_full_decode(tok: TextTokenizer) -> None:
    # The llama as bytes at the very end: only the last token can release it, with no extra event.
    ids = [*tok.encode("Hi there ", add_special_tokens=False), *(tok.token_id(f"<0x{b:02X}>") for b in "🦙".encode())]
    closed: list[bool] = []
    events = list(text_events(scripted(ids, "max_new_tokens", closed), tok, ("never seen",)))
    assert [e.token_id for e in events] == ids and [e.drafted for e in events] == [i % 2 == 1 for i in range(len(ids))]
    assert "".join(e.text for e in events) == tok.decode(ids) == "Hi there 🦙"
    assert events[-1].text.endswith("🦙") and events[-1].stop_reason == "max_new_tokens"
    assert [e.stop_reason for e in events[:-1]] == [None] * (len(ids) - 1) and not closed


@pytest.mark.parametrize("stop", ["two thr", "🦙", "e t"])
def test_a_stop_string_ends_the_text_before_it(tok: TextTokenizer, stop: str) -> None:
    text = "one two three 🦙 four"
    ids = tok.encode(text, add_special_tokens=False)
    closed: list[bool] = []
    events = list(text_events(scripted([*ids, 106], "eos", closed), tok, ("", stop, "not there")))
    assert "".join(e.text for e in events) == text[: text.index(stop)]
    assert events[-1].stop_reason == "stop_string" and closed  # the token loop was closed
    # The text stops with the token that completed the stop string (a character spelled in byte tokens, as
    # the llama is here, comes out with the token after its last byte).
    done = next(i for i in range(1, len(ids) + 1) if stop in tok.decode(ids[:i]))
    assert set(ids[done - 4:done]) <= tok.byte_ids if stop == "🦙" else not set(ids[:done]) & tok.byte_ids
    assert len(events) == done + (stop == "🦙")


def test_a_stop_string_completed_by_the_last_flush(tok: TextTokenizer) -> None:
    ids = [*tok.encode("Hi ", add_special_tokens=False), *(tok.token_id(f"<0x{b:02X}>") for b in "🦙".encode())]
    events = list(text_events(scripted(ids, "max_new_tokens", []), tok, ("🦙",)))
    assert "".join(e.text for e in events) == "Hi " and events[-1].stop_reason == "stop_string"


# -- stop strings everywhere a caller passes them ---------------------------------------------------------


def middle(text: str) -> str:
    """Two characters from the middle of `text`: a stop string that cuts it."""
    assert len(text) >= 6, text
    return text[len(text) // 2: len(text) // 2 + 2]


def test_stop_strings_in_stream_generate_and_chat(gen: Generator) -> None:
    gen.reset()
    full = gen.generate(PROMPT, 40, use_assistant=False)
    stop = middle(full.text)
    cut = full.text[: full.text.index(stop)]
    for use_assistant in (False, True):
        gen.reset()
        result = gen.generate(PROMPT, 40, use_assistant=use_assistant, stop_strings=(stop,))
        assert (result.text, result.stop_reason) == (cut, "stop_string")
        assert result.token_ids == full.token_ids[: len(result.token_ids)]
        gen.reset()
        events = list(gen.stream(PROMPT, 40, use_assistant=use_assistant, stop_strings=(stop,)))
        assert "".join(e.text for e in events) == cut and events[-1].stop_reason == "stop_string"
        assert gen.generate([5, 6], 2).token_ids  # the stopped stream freed the Generator

    gen.reset()
    answer = gen.collect(gen.chat("hello", max_new_tokens=40, use_assistant=False))
    stop = middle(answer.text)
    cut = answer.text[: answer.text.index(stop)]
    gen.reset()
    events = list(gen.chat("hello", max_new_tokens=40, use_assistant=False, stop_strings=(stop,)))
    assert "".join(e.text for e in events) == cut and events[-1].stop_reason == "stop_string"
    assert gen.messages[-1] == {"role": "assistant", "content": cut}

"""The real Gemma 4 tokenizer in the runtime: reference encodings, and streamed text equal to a full decode.

Gemma 4's vocabulary (262,144 tokens, byte fallback) ships in export/data/gemma4/; `tests/data/gemma4-tokenizer/`
holds 46 reference encodings of it (llama.cpp's tokenizer test cases for that vocabulary, encoded without BOS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgegen.runtime.detokenize import Detokenizer
from edgegen.runtime.tokenizer import TextTokenizer

DATA = Path(__file__).parent / "data" / "gemma4-tokenizer"
SPEC = {"files": ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"],
        "chat_template": "chat_template.jinja"}

# Emoji (one of them only as byte-fallback tokens), a ZWJ sequence, CJK, combining marks, RTL, and code.
TEXTS = [
    "Hello, world!",
    "日本語のテキストと中文文本，还有한국어.",
    "🦙🚀 😶\u200d🌫️ 👩🏽\u200d💻 — done",
    "e\u0301te\u0301 ñandú Ǆ ﬁ",
    "שלום עולם مرحبا بالعالم",
    "def f(x):\n\treturn x ** 2  # 平方\n\n\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 \U0001fae8 \U000e0041",
]


@pytest.fixture(scope="module")
def tok(gemma4_tokenizer_dir: Path) -> TextTokenizer:
    return TextTokenizer(gemma4_tokenizer_dir, SPEC)


def stream_text(tok: TextTokenizer, ids: list[int]) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    s = Detokenizer(tok)
    pieces = [s.push(i) for i in ids]
    return pieces, s.finish()


def test_reference_encodings(tok) -> None:
    texts = (DATA / "encode_cases.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (DATA / "encode_cases.out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    assert len(texts) == len(expected) == 46
    for text, ids in zip(texts, expected, strict=True):
        assert tok.encode(text, add_special_tokens=False) == [int(x) for x in ids.split()], repr(text)


def test_vocabulary_and_control_tokens(tok) -> None:
    assert tok.backend.get_vocab_size() == 262144
    ids = {name: tok.token_id(name) for name in ("<eos>", "<bos>", "<|think|>", "<|channel>", "<channel|>",
                                                "<|turn>", "<turn|>", "<|tool_call>", "<tool_call|>", '<|"|>')}
    assert ids == {"<eos>": 1, "<bos>": 2, "<|think|>": 98, "<|channel>": 100, "<channel|>": 101, "<|turn>": 105,
                   "<turn|>": 106, "<|tool_call>": 48, "<tool_call|>": 49, '<|"|>': 52}
    # Control tokens are not text; tool-call markup is (the caller parses it).
    assert {1, 2, 98, 100, 101, 105, 106} <= tok.hidden_ids
    assert not {48, 49, 52} & tok.hidden_ids


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_the_full_decode(tok, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    pieces, (thinking, rest) = stream_text(tok, ids)
    streamed = "".join(a for _, a in pieces) + rest
    assert streamed == tok.decode(ids) == text
    assert not thinking and not any(t for t, _ in pieces)
    # Characters come out whole: never a replacement character for valid text, even mid-stream.
    assert not any("\ufffd" in a for _, a in pieces)


def test_a_character_in_byte_fallback_tokens_comes_out_whole_after_its_run(tok) -> None:
    """A full decode turns a byte run with any invalid byte into U+FFFDs (all of it), so the character
    is released with the token after its run, never before, and never in pieces."""
    ids = tok.encode("a🦙b", add_special_tokens=False)
    byte_ids = [tok.token_id(f"<0x{b:02X}>") for b in "🦙".encode()]
    at = ids.index(byte_ids[0])
    assert ids[at: at + 4] == byte_ids  # this emoji is not in the vocabulary: four byte tokens
    pieces = [a for _, a in stream_text(tok, ids)[0]]
    assert pieces[at: at + 4] == ["", "", "", ""] and pieces[at + 4] == "🦙b"
    # One stray byte after the character makes the whole run invalid in a full decode, and in the stream.
    stray = [*ids[:at + 4], tok.token_id("<0x97>"), *ids[at + 4:]]
    pieces, (_, rest) = stream_text(tok, stray)
    assert "".join(a for _, a in pieces) + rest == tok.decode(stray) == "a" + "\ufffd" * 5 + "b"


def test_random_ids_stream_to_the_full_decode(tok) -> None:
    """Arbitrary model output, including invalid UTF-8 from stray byte tokens, control tokens and tool
    markup: the streamed pieces are always a prefix of the full decode and end equal to it."""
    rng = np.random.default_rng(0)
    byte_ids = [tok.token_id(f"<0x{b:02X}>") for b in range(256)]
    utf8_ids = [tok.token_id(f"<0x{b:02X}>") for b in "é日🦙".encode()]
    special = [1, 2, 46, 48, 49, 52, 105, 106, 258880]
    for trial in range(150):
        n = int(rng.integers(1, 40))
        choice = rng.integers(0, 10, size=n)
        ids = []
        for c in choice:
            if c < 5:
                ids.append(int(rng.integers(236000, 262144 - 4000)) if c == 0 else int(rng.integers(200, 60000)))
            elif c < 7:
                ids.extend(utf8_ids[int(rng.integers(0, len(utf8_ids))):][:int(rng.integers(1, 5))])
            elif c < 9:
                ids.append(byte_ids[int(rng.integers(0, 256))])
            else:
                ids.append(special[int(rng.integers(0, len(special)))])
        full = tok.decode(ids)
        s = Detokenizer(tok)
        so_far = ""
        for i in ids:
            thinking, piece = s.push(i)
            assert not thinking
            so_far += piece
            assert full.startswith(so_far), (trial, ids)
        so_far += s.finish()[1]
        assert so_far == full, (trial, ids)


def test_thinking_channel_apart_from_the_answer(tok) -> None:
    """Gemma 4 output with thinking: `<|channel>thought\\n ... <channel|>answer<turn|>`."""
    thought = "Let me think 🤔 about 日本 and 🦙."
    answer = "The answer is 42 — 四十二."
    ids = ([100, *tok.encode("thought\n" + thought, add_special_tokens=False), 101,
            *tok.encode(answer, add_special_tokens=False), 106])
    pieces, (t_rest, a_rest) = stream_text(tok, ids)
    assert "".join(t for t, _ in pieces) + t_rest == thought
    assert "".join(a for _, a in pieces) + a_rest == answer
    first_answer = ids.index(101) + 1
    assert not any(t for t, _ in pieces[first_answer:]) and not any(a for _, a in pieces[:first_answer])


def test_empty_thought_channel_and_tool_call_markup(tok) -> None:
    """Without thinking the prompt already holds the empty channel; a tool call keeps its markup."""
    call = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    ids = [*tok.encode(call, add_special_tokens=False), 106]
    assert 48 in ids and 52 in ids
    pieces, (t_rest, a_rest) = stream_text(tok, ids)
    assert "".join(a for _, a in pieces) + a_rest == call
    assert not t_rest and not any(t for t, _ in pieces)
    # A channel that is opened and closed at once holds no thinking.
    pieces, (t_rest, a_rest) = stream_text(tok, [100, *tok.encode("thought\n", add_special_tokens=False), 101,
                                                 *tok.encode("Hi", add_special_tokens=False)])
    assert "".join(t for t, _ in pieces) + t_rest == "" and "".join(a for _, a in pieces) + a_rest == "Hi"

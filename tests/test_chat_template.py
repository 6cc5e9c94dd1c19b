"""Chat prompts as transformers renders them, system/tools/thinking through `Generator.chat`, and the end of
a Gemma 4 turn (`<turn|>`) as a stop token from the checkpoint's generation config to the runtime.

The oracle for rendering is transformers' own `apply_chat_template` on a `PreTrainedTokenizerFast` built
from the same tokenizer.json and template (tests may import transformers; the runtime never does).
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.generate import Generator, Stats, Token
from edgegen.runtime.tokenizer import TextTokenizer

SPEC = {"files": ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"],
        "chat_template": "chat_template.jinja"}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
        "days": {"type": "integer", "description": "Forecast days", "nullable": True},
        "where": {"type": "object", "description": "Coordinates", "properties": {
            "lat": {"type": "number"}, "lon": {"type": "number"}}, "required": ["lat"]},
        "tags": {"type": "array", "items": {"type": "string"}, "description": "Labels"},
    }, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    "response": {"type": "object", "description": "Top results"}}}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello 🦙, 日本語は?"}],
    "system+user": [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "Hi"}],
    "developer+user": [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
    "multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nsimple<channel|>4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
        {"role": "user", "content": "Thanks"},
    ],
    "tool-call-and-response": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 2, "ok": True}}}]},
        {"role": "tool", "tool_responses": [{"name": "get_weather", "response": {"temp": 21, "sky": "clear"}}]},
        {"role": "assistant", "content": "21 °C and clear.", "tool_calls": None},
        {"role": "user", "content": [{"type": "text", "text": "And in Oslo?"}]},
    ],
}


@pytest.fixture(scope="module")
def tok(gemma4_tokenizer_dir: Path) -> TextTokenizer:
    return TextTokenizer(gemma4_tokenizer_dir, SPEC)


@pytest.fixture(scope="module")
def hf(gemma4_tokenizer_dir: Path):
    from transformers import PreTrainedTokenizerFast

    config = json.loads((gemma4_tokenizer_dir / "tokenizer_config.json").read_text())
    names = {k: v for k, v in config.items() if k.endswith("_token")}
    t = PreTrainedTokenizerFast(tokenizer_file=str(gemma4_tokenizer_dir / "tokenizer.json"), **names)
    t.chat_template = (gemma4_tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return t


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [False, True], ids=["no-think", "think"])
@pytest.mark.parametrize("tools", [None, [WEATHER, SEARCH]], ids=["no-tools", "tools"])
@pytest.mark.parametrize("generation_prompt", [True, False], ids=["gen-prompt", "no-gen-prompt"])
def test_real_template_renders_like_transformers(tok, hf, name, thinking, tools, generation_prompt) -> None:
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                      enable_thinking=thinking, tokenize=False)
    text = tok.render_chat(messages, add_generation_prompt=generation_prompt, tools=tools, enable_thinking=thinking)
    assert text == expected
    ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                 enable_thinking=thinking, tokenize=True, return_dict=False)
    assert tok.encode(text, add_special_tokens=False) == list(ids)
    # What the switches do in this template (so a renderer that ignores them cannot pass by luck).
    assert text.startswith("<bos>")
    assert ("<|think|>" in text) == thinking
    assert ("<|tool>declaration:get_weather{" in text) == (tools is not None)
    if generation_prompt:
        assert text.endswith("<|turn>model\n" if thinking else "<|turn>model\n<|channel>thought\n<channel|>")


def test_the_environment_matches_transformers(tmp_path: Path, gemma4_tokenizer_dir: Path) -> None:
    """Loop controls, a {% generation %} block, namespaces, dict(), tojson without HTML escaping and
    with its options, strftime_now: the same text as transformers' chat-template environment."""
    from transformers import PreTrainedTokenizerFast

    template = (
        "{%- set ns = namespace(n=0) -%}"
        "{%- for m in messages -%}{%- if m.role == 'skip' %}{% continue %}{% endif -%}"
        "{%- if ns.n >= 2 %}{% break %}{% endif -%}{%- set ns.n = ns.n + 1 -%}"
        "{%- generation -%}[{{ m.role }}] {{ m.content | tojson }}{%- endgeneration %}\n"
        "{% endfor -%}"
        "{{ tools | tojson(indent=2, sort_keys=true) }}|{{ dict(a=1, b='<&>') | tojson(separators=(',', ':')) }}"
        "|{{ strftime_now('%Y') }}|{{ bos_token }}{{ eos_token }}"
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(gemma4_tokenizer_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(template, encoding="utf-8")
    tok = TextTokenizer(tmp_path, SPEC)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<bos>", eos_token="<eos>")
    hf.chat_template = template
    messages = [{"role": "user", "content": "a <b> & 'c' é"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "never shown"}]
    tools = [SEARCH]
    text = tok.render_chat(messages, add_generation_prompt=False, tools=tools)
    assert text == hf.apply_chat_template(messages, tools=tools, tokenize=False)
    assert '"a <b> & \'c\' é"' in text and "never shown" not in text and '{"a":1,"b":"<&>"}' in text
    assert f"|{datetime.now().year}|<bos><eos>" in text


def test_template_errors_are_one_line(tmp_path: Path, gemma4_tokenizer_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(gemma4_tokenizer_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}"
        "{% endif %}{% set ns = namespace() %}{% set ns._x = 1 %}", encoding="utf-8")
    tok = TextTokenizer(tmp_path, SPEC)
    with pytest.raises(EdgegenError, match="Conversations must start with a user turn"):
        tok.render_chat([{"role": "system", "content": "x"}])
    with pytest.raises(EdgegenError, match="_x") as err:  # no underscore names through namespace()
        tok.render_chat([{"role": "user", "content": "x"}])
    assert "\n" not in str(err.value)


# -- Generator.chat: system, tools and thinking; the answer apart from the thinking ---------------------------


class ScriptedModel:
    """Stands in for the token loop: records each prompt and emits the given token ids, the last one with
    its stop reason (an EOS id of the e2b-like bundle, or the budget)."""

    def __init__(self, outputs: list[list[int]]):
        self.outputs, self.prompts = list(outputs), []

    def __call__(self, prompt_ids, max_new_tokens=128, sampling=None, use_assistant=True, draft_tokens=None, soft=()):
        self.prompts.append(list(prompt_ids))
        stats = Stats(prompt_tokens=len(prompt_ids))
        ids = self.outputs.pop(0)[:max_new_tokens]
        for i, t in enumerate(ids):
            stats.new_tokens = i + 1
            last = i == len(ids) - 1
            yield Token(t, False, stats, ("eos" if t in (1, 106) else "max_new_tokens") if last else None)


@pytest.fixture(scope="module")
def chat_gen(bundle_dir, tok) -> Generator:
    """A bundle's Generator with the real Gemma 4 tokenizer in place of the test tokenizer."""
    gen = Generator(bundle_dir("e2b-like", True))
    gen._tokenizer = tok
    gen.eos_ids = {1, 106}
    return gen


def test_chat_turns_with_system_tools_and_thinking(monkeypatch, chat_gen, tok, hf) -> None:
    gen = chat_gen
    gen.reset()
    thought, answer = "The user wants weather 🌦; call the tool.", "Let me check — 少々お待ちください."
    call = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    model = ScriptedModel([[100, *enc("thought\n" + thought), 101, *enc(answer + call), 106],
                           [*enc("Sunny."), 106]])
    monkeypatch.setattr(gen, "stream_ids", model)

    events = list(gen.chat("Weather in Paris?", system="Be brief.", enable_thinking=True, tools=[WEATHER]))
    assert "".join(e.thinking for e in events) == thought
    assert "".join(e.text for e in events) == answer + call
    assert events[-1].token_id == 106 and events[-1].stop_reason == "eos"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    assert model.prompts[0] == list(hf.apply_chat_template(messages, tools=[WEATHER], enable_thinking=True,
                                                           add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
    # The conversation keeps the answer (tool call included), not the thinking.
    assert gen.messages == [*messages, {"role": "assistant", "content": answer + call}]

    result_text = "".join(e.text for e in gen.chat("Thanks!", tools=[WEATHER]))
    assert result_text == "Sunny."
    messages += [{"role": "assistant", "content": answer + call}, {"role": "user", "content": "Thanks!"}]
    assert model.prompts[1] == list(hf.apply_chat_template(messages, tools=[WEATHER], add_generation_prompt=True,
                                                           tokenize=True, return_dict=False))
    # A new system instruction replaces the old one.
    monkeypatch.setattr(gen, "stream_ids", ScriptedModel([[*enc("Ok"), 1]]))
    assert "".join(e.text for e in gen.chat("Again", system="Be verbose.")) == "Ok"
    assert gen.messages[0] == {"role": "system", "content": "Be verbose."}
    assert [m["role"] for m in gen.messages].count("system") == 1


def test_chat_stop_strings_cut_the_answer_not_the_thinking(monkeypatch, chat_gen, tok) -> None:
    gen = chat_gen
    gen.reset()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    monkeypatch.setattr(gen, "stream_ids", ScriptedModel([[100, *enc("thought\nSTOP is just a word"), 101,
                                                           *enc("one two STOP three"), 106]]))
    events = list(gen.chat("count", enable_thinking=True, stop_strings=("STOP",)))
    assert "".join(e.thinking for e in events) == "STOP is just a word"
    assert "".join(e.text for e in events) == "one two "
    assert events[-1].stop_reason == "stop_string"


def test_generate_result_separates_thinking(monkeypatch, chat_gen, tok) -> None:
    gen = chat_gen
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    monkeypatch.setattr(gen, "stream_ids", ScriptedModel([[100, *enc("thought\nhmm 🤔"), 101, *enc("Yes 🦙"), 106]]))
    result = gen.generate([2, 105], max_new_tokens=50)
    assert (result.thinking, result.text, result.stop_reason) == ("hmm 🤔", "Yes 🦙", "eos")
    assert result.token_ids[-1] == 106


# -- <turn|> stops generation: from a real-shaped checkpoint through the export to the runtime --------------

# google/gemma-4-E2B-it's generation_config.json: the end of a turn is an EOS id beside <eos>.
E2B_GENERATION_CONFIG = {"bos_token_id": 2, "do_sample": True, "eos_token_id": [1, 106], "pad_token_id": 0,
                         "top_k": 64, "top_p": 0.95, "temperature": 1.0}
END_OF_TURN = 106


@pytest.fixture(scope="module")
def turn_end_bundle(pair_dir, tmp_path_factory) -> Path:
    """The e2b-like test pair with the real E2B generation config (its model config names only <eos>)."""
    from edgegen.export.bundle import ExportOptions, export_bundle

    target, assistant = pair_dir("e2b-like", True)
    root = tmp_path_factory.mktemp("turn-end")
    shutil.copytree(target, root / "target")
    cfg = json.loads((root / "target" / "config.json").read_text())
    cfg["eos_token_id"] = 1
    (root / "target" / "config.json").write_text(json.dumps(cfg))
    (root / "target" / "generation_config.json").write_text(json.dumps(E2B_GENERATION_CONFIG))
    out = root / "bundle"
    export_bundle(str(root / "target"), str(assistant), out, ExportOptions(max_context=128, verify=False))
    return out


def force_token(monkeypatch, gen: Generator, token: int, from_call: int) -> list[int]:
    """From the `from_call`-th target call on, make `token` the target's choice at every kept position."""
    calls = [0]
    forward = gen.bundle.target.forward

    def forced(cache, ids, logits_to_keep=1, soft=None, pad_id=0):
        logits, hidden = forward(cache, ids, logits_to_keep, soft, pad_id)
        calls[0] += 1
        if calls[0] >= from_call:
            logits = logits.copy()
            logits[:, token] = logits.max() + 100.0
        return logits, hidden

    monkeypatch.setattr(gen.bundle.target, "forward", forced)
    return calls


@pytest.mark.parametrize("use_assistant", [False, True], ids=["plain", "speculative"])
def test_generation_stops_at_end_of_turn(monkeypatch, turn_end_bundle: Path, use_assistant: bool) -> None:
    prompt = [2, 105, 40, 41, 42, 43]
    gen = Generator(turn_end_bundle, threads=1, draft_tokens=4)
    assert gen.bundle.manifest.generation["eos_token_ids"] == [1, END_OF_TURN]
    natural = gen.generate(prompt, max_new_tokens=12, use_assistant=False).token_ids
    assert len(natural) == 12 and END_OF_TURN not in natural  # the random target does not end by itself

    # A non-stop token forced the same way does not end the output: the stop comes from the id.
    calls = force_token(monkeypatch, gen, 107, from_call=3)
    other = gen.generate(prompt, max_new_tokens=12, use_assistant=use_assistant)
    assert len(other.token_ids) == 12 and other.stop_reason == "max_new_tokens" and 107 in other.token_ids

    monkeypatch.undo()
    calls = force_token(monkeypatch, gen, END_OF_TURN, from_call=3)
    result = gen.generate(prompt, max_new_tokens=12, use_assistant=use_assistant)
    assert result.token_ids[-1] == END_OF_TURN and END_OF_TURN not in result.token_ids[:-1]
    assert result.stop_reason == "eos"
    assert calls[0] == 3  # no target call after the one that chose <turn|>
    if not use_assistant:
        assert result.token_ids == [*natural[:2], END_OF_TURN]


# -- the CLI: --system and --think make the prompt a chat turn ----------------------------------------------


def run_cli(*args: str) -> dict:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "edgegen", "run", *args, "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cli_system_and_think(bundle_dir) -> None:
    path = bundle_dir("e2b-like", True)
    tok = Generator(path).tokenizer
    raw = run_cli(str(path), "-p", "hello there", "-n", "3", "--no-assistant")
    assert raw["stats"]["prompt_tokens"] == len(tok.encode("hello there"))
    turn = run_cli(str(path), "-p", "hello there", "--system", "Be brief.", "-n", "3", "--no-assistant")
    prompt = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}])
    assert turn["stats"]["prompt_tokens"] == len(tok.encode(prompt, add_special_tokens=False))
    thinking = run_cli(str(path), "-p", "hello there", "--think", "-n", "3", "--no-assistant")
    prompt = tok.render_chat([{"role": "user", "content": "hello there"}], enable_thinking=True)
    assert thinking["stats"]["prompt_tokens"] == len(tok.encode(prompt, add_special_tokens=False))
    assert thinking["thinking"] == ""  # the test model has no thinking channel

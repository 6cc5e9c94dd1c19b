"""The bundle's tokenizer (tokenizers' JSON format) and its chat template (Jinja, sandboxed).

The template is rendered the way transformers' `apply_chat_template` renders it, so that a bundle's prompt
is token for token the prompt the model was trained on: the same Jinja settings (trim_blocks,
lstrip_blocks, the `loopcontrols` extension, a `{% generation %}` block), the same helpers
(`raise_exception`, `strftime_now`, a `tojson` filter that does not escape HTML), the tokenizer config's
special tokens as variables, and messages reduced to plain JSON data with None-valued keys dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from edgegen.runtime.errors import EdgegenError

# Gemma 4 chat markup: the model's reasoning goes in a channel, `<|channel>thought\n ... <channel|>`, before
# its answer; a turn ends with `<turn|>`. Tool calls are written with special tokens too; those stay in the
# decoded text (the caller parses them), every other special token is left out.
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
END_OF_TURN = "<turn|>"
TOOL_SYNTAX = ("<|tool_call>", "<tool_call|>", '<|"|>')
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TextTokenizer:
    def __init__(self, bundle: Path, spec: dict):
        from tokenizers import Tokenizer

        path = bundle / "tokenizer.json"
        if "tokenizer.json" not in spec.get("files", []) or not path.is_file():
            raise EdgegenError(f"bundle '{bundle}' has no tokenizer.json; pass token ids or re-export with one")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception:
            raise EdgegenError(f"'{path}' is not a valid tokenizer file; re-export the bundle") from None
        cfg_path = bundle / "tokenizer_config.json"
        try:
            self.config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
            self.template = None
            if spec.get("chat_template"):
                self.template = (bundle / spec["chat_template"]).read_text(encoding="utf-8")
        except (OSError, ValueError):
            raise EdgegenError(f"the tokenizer config or chat template in '{bundle}' is unreadable; "
                               "re-export the bundle") from None
        if not isinstance(self.config, dict):
            raise EdgegenError(f"'{cfg_path}' is not a tokenizer config; re-export the bundle")
        self._compiled = None
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        shown = {self._tok.token_to_id(t) for t in TOOL_SYNTAX} - {None}
        self.hidden_ids = frozenset(special - shown)  # special tokens the decoded text leaves out
        # Byte-fallback tokens (SentencePiece-style vocabularies such as Gemma's; byte-level BPE has none).
        self.byte_ids = frozenset({self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256)} - {None})

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` (for incremental decoding)."""
        return self._tok

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (e.g. a Latin-1 argv)
            raise EdgegenError("the prompt is not valid UTF-8 text; convert it to UTF-8") from None
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` without control tokens (tool-call markup is kept)."""
        return self._tok.decode([i for i in ids if i not in self.hidden_ids], skip_special_tokens=False)

    def _special(self, key: str) -> str:
        value = self.config.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    enable_thinking: bool = False) -> str:
        """The conversation as the model's prompt text. `tools`: function declarations (JSON schema dicts,
        e.g. {"type": "function", "function": {"name", "description", "parameters"}})."""
        if self.template is None:
            raise EdgegenError("this bundle has no chat template; use a plain prompt instead of chat")
        from jinja2 import TemplateError

        if not all(isinstance(m, Mapping) for m in messages):
            raise EdgegenError("chat messages must be dicts with 'role' and 'content'")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise EdgegenError("tools must be a list of dicts (JSON-schema function declarations)")
        specials = {k: self._special(k) for k in _SPECIAL_KEYS if self._special(k)}
        try:  # the template comes from the bundle: sandboxed, and its failures are the bundle's
            if self._compiled is None:
                self._compiled = chat_environment().from_string(self.template)
            return self._compiled.render(
                **specials,
                messages=[{k: _plain(v) for k, v in m.items() if v is not None} for m in messages],
                tools=_plain(tools), documents=None, add_generation_prompt=add_generation_prompt,
                enable_thinking=bool(enable_thinking),
            )
        except (TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise EdgegenError(f"the bundle's chat template failed ({first}); fix the messages or "
                               "re-export the bundle") from None


def chat_environment():
    """A sandboxed Jinja environment with the settings and helpers chat templates are written against."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks; rendering
        it is rendering its body (in its own scope, as a call block)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """`namespace()` that refuses underscore names, so a template cannot shadow internals through it."""

        def __init__(*args, **kwargs):  # noqa: N805 - Jinja's own signature trick: `self` may be a field name
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Plain json.dumps: Jinja's own filter escapes <, >, & and ' for HTML, which a prompt must not have.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=_DictMaker())
    return env


class _DictMaker:
    """`dict(...)` in a template, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _plain(value):
    """What a template may see: JSON-like data only (callers put rich objects in messages; their methods are
    not for a template to call). Anything else becomes a placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (e.g. enums) back to the base type, their value unchanged
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"

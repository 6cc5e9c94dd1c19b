"""The bundle's tokenizer (tokenizers' JSON format) and its chat template (Jinja, sandboxed)."""

from __future__ import annotations

import json
from pathlib import Path

from edgegen.runtime.errors import EdgegenError


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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (e.g. a Latin-1 argv)
            raise EdgegenError("the prompt is not valid UTF-8 text; convert it to UTF-8") from None
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _special(self, key: str) -> str:
        value = self.config.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise EdgegenError("this bundle has no chat template; use a plain prompt instead of chat")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:  # the template comes from the bundle: sandboxed, and its failures are the bundle's
            return env.from_string(self.template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._special("bos_token"), eos_token=self._special("eos_token"),
            )
        except (TemplateError, TypeError, ValueError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise EdgegenError(f"the bundle's chat template failed ({first}); fix or re-export the bundle") from None

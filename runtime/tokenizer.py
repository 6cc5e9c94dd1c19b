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
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.template = None
        if spec.get("chat_template"):
            self.template = (bundle / spec["chat_template"]).read_text(encoding="utf-8")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _special(self, key: str) -> str:
        value = self.config.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise EdgegenError("this bundle has no chat template; use a plain prompt instead of chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._special("bos_token"), eos_token=self._special("eos_token"),
        )

"""Workarounds for transformers 5.23 bugs that break Gemma 4 assistants (docs/architecture.md, "Known traps").

1. `Gemma4TextConfig.kv_sharing_modes` raises when *every* layer is KV-shared, which is exactly what an
   assistant is: it owns no K/V and reads the target's store layers. No assistant can be built or loaded
   without this shim. We return "reuse" for every layer in that case and defer to the original otherwise.
2. A default assistant `generation_config.num_assistant_tokens` is None and `generate(assistant_model=)`
   fails on `int(None)`. `fix_assistant_generation_config` fills in a draft length.

Each shim is applied once, is idempotent, and is tested in tests/test_compat.py.
"""

from __future__ import annotations

DEFAULT_DRAFT_TOKENS = 4

_original_kv_sharing_modes = None


def _kv_sharing_modes(self) -> list[str | None]:
    if self.num_kv_shared_layers and self.num_kv_shared_layers == self.num_hidden_layers:
        return ["reuse"] * self.num_hidden_layers
    return _original_kv_sharing_modes.fget(self)


def apply_transformers_shims() -> None:
    global _original_kv_sharing_modes
    from transformers import Gemma4TextConfig

    if _original_kv_sharing_modes is not None:
        return
    _original_kv_sharing_modes = Gemma4TextConfig.kv_sharing_modes
    Gemma4TextConfig.kv_sharing_modes = property(_kv_sharing_modes)


def original_kv_sharing_modes(config) -> list[str | None]:
    """The unpatched property, for tests that show the bug is real."""
    return (_original_kv_sharing_modes or type(config).kv_sharing_modes).fget(config)


def fix_assistant_generation_config(assistant, draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
    gc = assistant.generation_config
    if getattr(gc, "num_assistant_tokens", None) is None:
        gc.num_assistant_tokens = draft_tokens
    # HF would otherwise grow/shrink k between rounds; edgegen measures with a fixed k.
    if getattr(gc, "num_assistant_tokens_schedule", None) not in (None, "constant"):
        gc.num_assistant_tokens_schedule = "constant"

"""Workarounds for transformers behaviour that breaks Gemma 4 assistants (docs/architecture.md, "Known traps").

1. In transformers 5.23, `Gemma4TextConfig.kv_sharing_modes` raises when *every* layer is KV-shared, which
   is exactly what an assistant is: it owns no K/V and reads the target's store layers. No assistant can be
   built or loaded there without a shim; 5.24 returns "reuse" for every layer itself. The shim is installed
   only when the installed transformers needs it: `kv_sharing_shim_needed()` asks the unpatched property
   about an all-shared config and looks at what it does, whatever the version number says.
2. A default assistant's `generation_config.num_assistant_tokens` is None, and `generate(assistant_model=)`
   needs a number. `fix_assistant_generation_config` fills in a draft length where none is set.

Both are idempotent and tested in tests/test_compat.py against the installed transformers.
"""

from __future__ import annotations

DEFAULT_DRAFT_TOKENS = 4

_original_kv_sharing_modes = None  # the unpatched property, once the shim is installed


def _kv_sharing_modes(self) -> list[str | None]:
    if self.num_kv_shared_layers and self.num_kv_shared_layers == self.num_hidden_layers:
        return ["reuse"] * self.num_hidden_layers
    return _original_kv_sharing_modes.fget(self)


def _all_shared_config():
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(num_hidden_layers=2, num_kv_shared_layers=2, layer_types=["sliding_attention",
                            "full_attention"], hidden_size=8, intermediate_size=16, num_attention_heads=1,
                            num_key_value_heads=1, head_dim=8, global_head_dim=8, vocab_size=16,
                            hidden_size_per_layer_input=0, vocab_size_per_layer_input=16)


def kv_sharing_shim_needed() -> bool:
    """Does the installed (unpatched) `kv_sharing_modes` fail on a config whose layers are all shared?"""
    from transformers import Gemma4TextConfig

    prop = _original_kv_sharing_modes or Gemma4TextConfig.kv_sharing_modes
    try:
        modes = prop.fget(_all_shared_config())
    except ValueError:
        return True
    return modes != ["reuse", "reuse"]


def kv_sharing_shim_installed() -> bool:
    return _original_kv_sharing_modes is not None


def apply_transformers_shims() -> None:
    global _original_kv_sharing_modes
    from transformers import Gemma4TextConfig

    if _original_kv_sharing_modes is not None or not kv_sharing_shim_needed():
        return
    _original_kv_sharing_modes = Gemma4TextConfig.kv_sharing_modes
    Gemma4TextConfig.kv_sharing_modes = property(_kv_sharing_modes)


def fix_assistant_generation_config(assistant, draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
    gc = assistant.generation_config
    if getattr(gc, "num_assistant_tokens", None) is None:
        gc.num_assistant_tokens = draft_tokens
    # HF would otherwise grow/shrink k between rounds; edgegen measures with a fixed k.
    if getattr(gc, "num_assistant_tokens_schedule", None) not in (None, "constant"):
        gc.num_assistant_tokens_schedule = "constant"

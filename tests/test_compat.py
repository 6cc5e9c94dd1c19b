"""The transformers shims in edgegen.export.compat: each is installed exactly when the installed transformers
needs it, and with them assistants build and assisted generation works, on any supported version.

These tests check behaviour (an all-shared assistant builds; greedy assisted generation equals greedy), never
the presence of an upstream bug: CI runs them against the pinned and the newest transformers.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma4AssistantForCausalLM, Gemma4TextConfig

from edgegen.export.compat import (
    DEFAULT_DRAFT_TOKENS,
    apply_transformers_shims,
    fix_assistant_generation_config,
    kv_sharing_shim_installed,
    kv_sharing_shim_needed,
)
from edgegen.export.testing import (
    BOS_ID,
    PRESETS,
    SPECIAL_TOKENS,
    assistant_config,
    build_assistant,
    build_target,
    target_text_config,
)

PRESET_NAMES = ["e2b-like", "e4b-like"]


def expected_store_layers(layer_types: list[str], num_kv_shared_layers: int) -> dict[str, int]:
    """The last non-shared layer of each attention kind, read off the layer pattern (not hard-coded)."""
    first_shared = len(layer_types) - num_kv_shared_layers
    return {kind: i for i, kind in enumerate(layer_types[:first_shared])}


def test_shim_is_installed_exactly_when_transformers_needs_it() -> None:
    """The unpatched property is asked about an all-shared config: it raises (5.23) or answers (5.24+)."""
    apply_transformers_shims()
    assert kv_sharing_shim_installed() == kv_sharing_shim_needed()
    if not kv_sharing_shim_installed():
        assert Gemma4TextConfig.kv_sharing_modes.fget.__module__.startswith("transformers.")


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_shimmed_assistant_builds_with_every_layer_kv_shared(preset: str) -> None:
    assistant = Gemma4AssistantForCausalLM(assistant_config(PRESETS[preset]))
    layers = assistant.model.layers
    assert len(layers) == 4
    assert all(layer.self_attn.is_kv_shared_layer for layer in layers)
    assert assistant.config.get_text_config().kv_sharing_modes == ["reuse"] * 4


@pytest.mark.parametrize(("preset", "store_layers"), [("e2b-like", (3, 4)), ("e4b-like", (4, 5))])
def test_shim_leaves_target_kv_sharing_modes_unchanged(preset: str, store_layers: tuple[int, int]) -> None:
    """The targets still store K/V at the last non-shared sliding and full layer, and share the rest."""
    text = target_text_config(PRESETS[preset])
    modes = text.kv_sharing_modes
    stores = expected_store_layers(text.layer_types, text.num_kv_shared_layers)
    assert (stores["sliding_attention"], stores["full_attention"]) == store_layers
    assert [i for i, mode in enumerate(modes) if mode == "store"] == list(store_layers)
    first_shared = text.num_hidden_layers - text.num_kv_shared_layers
    assert modes[first_shared:] == ["reuse"] * text.num_kv_shared_layers


def test_applying_the_shims_twice_changes_nothing() -> None:
    apply_transformers_shims()
    prop = Gemma4TextConfig.kv_sharing_modes
    apply_transformers_shims()
    assert Gemma4TextConfig.kv_sharing_modes is prop
    text = assistant_config(PRESETS["e2b-like"]).get_text_config()
    assert text.kv_sharing_modes == ["reuse"] * text.num_hidden_layers


def _prompt(vocab_size: int, length: int = 12) -> torch.Tensor:
    """<bos> and random non-special tokens; this seed makes both random targets continue without looping."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, (1, length), generator=generator)
    ids[0, 0] = BOS_ID
    return ids


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("centroid_head", [True, False])
def test_fixed_assistant_greedy_speculation_equals_greedy(preset: str, centroid_head: bool) -> None:
    target, assistant = build_target(preset), build_assistant(preset, centroid_head=centroid_head)
    assert assistant.generation_config.num_assistant_tokens is None  # what a default assistant config holds
    fix_assistant_generation_config(assistant)
    assert assistant.generation_config.num_assistant_tokens == DEFAULT_DRAFT_TOKENS
    drafts = []  # one entry per assistant step: proves the speculative path really ran
    assistant.register_forward_hook(lambda *_: drafts.append(1))
    prompt = _prompt(PRESETS[preset].vocab_size)
    plain = target.generate(prompt, max_new_tokens=8, do_sample=False)
    speculative = target.generate(prompt, assistant_model=assistant, max_new_tokens=8, do_sample=False)
    assert drafts
    assert len(set(plain[0, prompt.shape[1]:].tolist())) > 2  # a looping output would prove little
    assert torch.equal(speculative, plain)


def test_fix_keeps_a_chosen_draft_length_and_pins_the_schedule() -> None:
    assistant = build_assistant("e2b-like")
    assistant.generation_config.num_assistant_tokens = 7
    assistant.generation_config.num_assistant_tokens_schedule = "heuristic"
    fix_assistant_generation_config(assistant)
    assert assistant.generation_config.num_assistant_tokens == 7
    assert assistant.generation_config.num_assistant_tokens_schedule == "constant"

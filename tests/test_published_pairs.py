"""The larger pairs' published structure (export/data/gemma4/pairs.json) read by transformers' own classes:
the parameter counts their model cards state, and the structural fields the presets must share."""

from __future__ import annotations

import pytest
import torch

from edgegen.export.testing import PRESETS, realsize_configs, target_text_config


def _params(model_cls, config) -> tuple[int, int]:
    """(all parameters, expert parameters), counted on the meta device."""
    with torch.device("meta"):
        model = model_cls(config)
    named = list(model.named_parameters())
    return sum(p.numel() for _, p in named), sum(p.numel() for n, p in named if ".experts." in n)


@pytest.mark.parametrize(("name", "total_b", "assistant_m"), [("26b-a4b", 25.2, None), ("31b", 30.7, 470)])
def test_published_configs_have_the_published_sizes(name: str, total_b: float, assistant_m: int | None) -> None:
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    target, assistant = realsize_configs(name)
    total, experts = _params(Gemma4ForCausalLM, target)
    assert total / 1e9 == pytest.approx(total_b, abs=0.05)
    if name == "26b-a4b":  # 3.8B active: everything but the 120 unchosen experts of each layer
        active = total - experts * (1 - target.top_k_experts / target.num_experts)
        assert active / 1e9 == pytest.approx(3.8, abs=0.1)
    a_total, _ = _params(Gemma4AssistantForCausalLM, assistant)
    if assistant_m:  # the 31B assistant's model card: ~470M
        assert a_total / 1e6 == pytest.approx(assistant_m, abs=5)
    full = target.layer_types.index("full_attention")
    assert target.per_layer_config[full].head_dim == 512 and target.per_layer_config[0].head_dim == 256
    assert target.kv_sharing_modes[full] is None and not target.hidden_size_per_layer_input
    assert assistant.backbone_hidden_size == target.hidden_size and not assistant.use_ordered_embeddings


@pytest.mark.parametrize(("preset", "published"), [("moe-like", "26b-a4b"), ("31b-like", "31b")])
def test_presets_keep_the_published_structure(preset: str, published: str) -> None:
    small, real = target_text_config(PRESETS[preset]), realsize_configs(published)[0]
    for field in ("attention_k_eq_v", "enable_moe_block", "num_kv_shared_layers", "hidden_size_per_layer_input",
                  "final_logit_softcapping", "tie_word_embeddings", "hidden_activation"):
        assert getattr(small, field) == getattr(real, field), field
    assert small.layer_types[:6] == real.layer_types[:6]
    for kind in ("sliding_attention", "full_attention"):  # fewer KV heads on full layers, as published
        i, j = small.layer_types.index(kind), real.layer_types.index(kind)
        assert (small.per_layer_config[i].num_key_value_heads < small.num_attention_heads) == \
               (real.per_layer_config[j].num_key_value_heads < real.num_attention_heads)
    full = small.layer_types.index("full_attention")
    assert small.per_layer_config[full].num_key_value_heads < small.per_layer_config[0].num_key_value_heads
    assert bool(small.top_k_experts) == bool(real.top_k_experts)

"""The bundled demo target (models/demo/target) is what models/recipe says it is.

Tokenizer: byte-level BPE with Gemma's special-token ids, `<bos>` first, exact round trip of source code.
Config: every structural feature of E2B (per-layer embeddings, KV-shared layers fed by a sliding and a
full store layer, different head dims, proportional RoPE, softcapping, double-wide MLP).
Weights: within the size budget, stored in bfloat16, and actually trained: held-out loss far below
chance and a greedy continuation that is not one token repeated.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

from edgegen.export.testing import CHAT_TEMPLATE, SPECIAL_TOKENS

REPO = Path(__file__).resolve().parent.parent
DEMO_TARGET = REPO / "models" / "demo" / "target"
TOKENIZER = DEMO_TARGET / "tokenizer.json"
WEIGHTS = sorted(DEMO_TARGET.glob("*.safetensors"))
MAX_WEIGHT_BYTES = 18 * 1024 * 1024

needs_tokenizer = pytest.mark.skipif(not TOKENIZER.is_file(), reason="demo tokenizer not built")
needs_target = pytest.mark.skipif(
    not (WEIGHTS and (DEMO_TARGET / "config.json").is_file()), reason="demo target not trained"
)

SOURCE = '''def parse_args(argv=None):
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--count", type=int, default=3)  # trailing comment
    return parser.parse_args(argv)


class Point:
\tdef __init__(self, x, y):\r\n\t\tself.x, self.y = x, y
'''


def _recipe_data():
    """models/recipe/data.py, loaded by path (models/ is data, not an installed package)."""
    spec = importlib.util.spec_from_file_location("demo_recipe_data", REPO / "models" / "recipe" / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER))


@needs_tokenizer
def test_tokenizer_round_trips_source_code(tokenizer):
    import textwrap

    for text in (SOURCE, Path(textwrap.__file__).read_text(encoding="utf-8")):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        assert 3 not in ids  # byte-level: never <unk>


@needs_tokenizer
def test_tokenizer_special_tokens_and_bos(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert tokenizer.get_vocab_size() == 4096
    ids = tokenizer.encode("def parse_args(").ids
    assert ids[0] == 2 and 2 not in ids[1:]
    assert tokenizer.encode("x", add_special_tokens=False).ids[0] != 2
    config = json.loads((DEMO_TARGET / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    assert (DEMO_TARGET / "chat_template.jinja").read_text() == CHAT_TEMPLATE


@needs_target
def test_demo_target_has_every_e2b_structural_feature():
    from transformers import Gemma4TextConfig

    config = Gemma4TextConfig.from_pretrained(DEMO_TARGET)
    n = config.num_hidden_layers
    kinds = config.layer_types
    modes = config.kv_sharing_modes
    first_shared = n - config.num_kv_shared_layers
    head_dims = {kind: {config.per_layer_config[i].head_dim for i in range(n) if kinds[i] == kind} for kind in kinds}

    assert config.hidden_size_per_layer_input > 0 and config.vocab_size_per_layer_input == config.vocab_size
    assert 0 < config.num_kv_shared_layers < n and abs(config.num_kv_shared_layers - n / 2) <= 1
    assert modes[first_shared:] == ["reuse"] * config.num_kv_shared_layers
    assert {kinds[i] for i in range(first_shared) if modes[i] == "store"} == {"sliding_attention", "full_attention"}
    assert kinds[-1] == "full_attention"
    assert head_dims["sliding_attention"] == {32} and head_dims["full_attention"] == {64}
    assert config.sliding_window == 128 and config.max_position_embeddings == 4096
    assert config.num_key_value_heads == 1
    assert config.rope_parameters["full_attention"]["rope_type"] == "proportional"
    assert config.final_logit_softcapping == 30.0
    assert config.use_double_wide_mlp and not config.attention_k_eq_v
    assert config.tie_word_embeddings and config.hidden_activation == "gelu_pytorch_tanh"
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (2, [1, 5], 0)
    generation = json.loads((DEMO_TARGET / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 5] and generation["do_sample"] is False


@needs_target
def test_demo_weights_fit_the_budget_in_bfloat16():
    assert sum(p.stat().st_size for p in WEIGHTS) <= MAX_WEIGHT_BYTES
    for path in WEIGHTS:
        with path.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


@pytest.fixture(scope="module")
def demo_target():
    import torch
    from transformers import Gemma4ForCausalLM

    return Gemma4ForCausalLM.from_pretrained(DEMO_TARGET, dtype=torch.float32).eval()


@needs_target
def test_demo_target_beats_chance_on_heldout_code(demo_target, tokenizer):
    import torch
    import torch.nn.functional as F

    heldout = "".join(_recipe_data().heldout_texts()[:3])
    ids = torch.tensor([tokenizer.encode(heldout).ids[:400]])
    with torch.no_grad():
        logits = demo_target(input_ids=ids).logits
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert loss < 0.6 * math.log(tokenizer.get_vocab_size()), loss


@needs_target
def test_demo_target_greedy_continuation_is_not_one_repeated_token(demo_target, tokenizer):
    import torch

    prompt = torch.tensor([tokenizer.encode("def ").ids])
    out = demo_target.generate(prompt, max_new_tokens=24, do_sample=False)
    new = out[0, prompt.shape[1]:].tolist()
    assert len(set(new)) > 1, tokenizer.decode(new)

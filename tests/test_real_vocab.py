"""A pair with small layers but the real 262,144-token vocabulary and the real Gemma 4 tokenizer and chat
template, end to end: exported, then generated token-equal to transformers, greedy and assisted.

The prompts are chat turns rendered by transformers' own `apply_chat_template` with the real template; the
runtime renders and tokenizes them itself (`Generator.chat`), so the tokenizer, template, 262k-row tables and
the stop at <turn|> are all on the path.
"""

from __future__ import annotations

import pytest
import torch

from edgegen.export.bundle import ExportOptions, export_bundle
from edgegen.export.loading import load_pair
from edgegen.export.testing import GEMMA4_TURN_END_ID, GEMMA4_VOCAB, PRESETS, save_pair
from edgegen.runtime.generate import Generator

MESSAGES = ["Write a haiku about the sea.", "¿Qué hora es? 日本語でお願いします 🙂", "def fib(n):"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory):
    """(HF pair, bundle path, transformers tokenizer) for the real-vocab preset, exported fp32 and verified."""
    from transformers import AutoTokenizer

    assert PRESETS["real-vocab"].vocab_size == GEMMA4_VOCAB
    root = tmp_path_factory.mktemp("real-vocab")
    target, assistant = save_pair(root, "real-vocab", real_tokenizer=True)
    out = root / "bundle"
    manifest = export_bundle(str(target), str(assistant), out, ExportOptions(max_context=256))
    assert all(check["passed"] for check in manifest.parity["checks"].values())
    assert GEMMA4_TURN_END_ID in manifest.generation["eos_token_ids"]
    return load_pair(str(target), str(assistant)), out, AutoTokenizer.from_pretrained(target)


def _hf_generate(pair, ids: list[int], assisted: bool) -> list[int]:
    extra = {"assistant_model": pair.assistant} if assisted else {}
    with torch.no_grad():
        out = pair.target.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=NEW_TOKENS, do_sample=False, **extra)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("message", MESSAGES)
def test_chat_turn_equals_transformers_greedy_and_assisted(real_vocab, message: str) -> None:
    pair, bundle, hf_tokenizer = real_vocab
    conversation = [{"role": "user", "content": message}]
    ids = hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    plain_hf, assisted_hf = _hf_generate(pair, ids, False), _hf_generate(pair, ids, True)
    assert assisted_hf == plain_hf  # transformers' own promise, on this pair
    for draft_tokens in (0, 4):
        gen = Generator(bundle, threads=1)
        result = gen.collect(gen.chat(message, max_new_tokens=NEW_TOKENS, use_assistant=draft_tokens > 0,
                                      draft_tokens=draft_tokens or None))
        assert result.token_ids == plain_hf, f"draft_tokens={draft_tokens}"
        assert gen.processed[:len(ids)] == ids  # the runtime rendered and tokenized the turn as transformers did
        assert result.stats.drafted > 0 if draft_tokens else result.stats.drafted == 0

"""Step 1 of the demo build: a byte-level BPE tokenizer with Gemma-style special tokens.

Trained on the *training* split only (models/recipe/data.py), so held-out text is out of vocabulary
statistics too. Byte-level means every string round-trips exactly: no `<unk>` ever appears.
The special tokens and their ids, and the chat template, are the ones synthetic test pairs use
(edgegen.export.testing), so the demo pair and the test pairs share one contract.

    python models/recipe/tokenizer.py [--vocab-size 4096] [--out models/demo/target]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import data

from edgegen.export.testing import BOS_ID, CHAT_TEMPLATE, SPECIAL_TOKENS

DEFAULT_OUT = data.REPO / "models" / "demo" / "target"


def train_tokenizer(vocab_size: int = 4096):
    """The demo tokenizer as a transformers fast tokenizer (save it with `save_pretrained`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = SPECIAL_TOKENS[BOS_ID]
    # Like Gemma: `encode(text)` starts with <bos>; chat templates write it themselves and are encoded
    # with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # trained first, in order: their ids are their list positions
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(data.train_texts(), trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == token_id, (token, tok.token_to_id(token))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        clean_up_tokenization_spaces=False,  # decode must give back source code byte for byte
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    tokenizer = train_tokenizer(args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"tokenizer: {len(tokenizer)} tokens -> {args.out}")


if __name__ == "__main__":
    main()

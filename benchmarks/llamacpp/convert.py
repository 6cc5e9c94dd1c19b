"""llama.cpp's convert_hf_to_gguf.py with three in-memory patches for edgegen's test checkpoints.

    LLAMA_CPP_DIR=WORK/llama.cpp WORK/venv/bin/python convert.py MODEL_DIR --outtype f32|bf16 --outfile OUT.gguf

LLAMA_CPP_DIR is the llama.cpp source tree that build.sh unpacked (llama-cpp-python 0.3.36's vendored copy,
ggml-org/llama.cpp@0c1e57098); the converter there is not modified. The patches change nothing for the
published Gemma 4 checkpoints (their tokenizer is recognized and their vocabulary matches the model's):
 1. Gemma4Model.set_vocab: the small test pairs ship a GPT-2-style byte-level BPE tokenizer (no byte
    fallback) that the Gemma vocab writer rejects; fall back to the generic GPT-2 BPE writer.
 2. get_vocab_base_pre: an unknown pre-tokenizer hash maps to "gpt-2" (their pre-tokenizer is ByteLevel
    with the GPT-2 split regex, which is what llama.cpp's "gpt-2" pre-tokenizer does).
 3. token_embd keeps every row of the model's vocabulary: the converter trims it to the tokenizer's size
    (e.g. 8350 of 32768 rows for e2b-slice), which would make llama.cpp's tied lm_head smaller than edgegen's.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

DEFAULT_TREE = Path(__file__).resolve().parents[2] / "build" / "llamacpp" / "llama.cpp"  # build.sh's default
LLAMA_CPP = Path(os.environ.get("LLAMA_CPP_DIR", DEFAULT_TREE))
log = logging.getLogger("convert-edgegen")


def patch(conv_base, conv_gemma) -> None:
    set_vocab = conv_gemma.Gemma4Model.set_vocab

    def set_vocab_or_gpt2(self):
        try:
            set_vocab(self)
        except (FileNotFoundError, TypeError) as exc:
            log.warning("Gemma 4 vocab writer failed (%r); writing a GPT-2 byte-level BPE vocab", exc)
            self._set_vocab_gpt2()
            self.gguf_writer.add_add_bos_token(True)

    conv_gemma.Gemma4Model.set_vocab = set_vocab_or_gpt2

    vocab_base_pre = conv_base.TextModel.get_vocab_base_pre

    def vocab_base_pre_or_gpt2(self, tokenizer):
        try:
            return vocab_base_pre(self, tokenizer)
        except NotImplementedError:
            log.warning("unknown BPE pre-tokenizer hash; using 'gpt-2'")
            return "gpt-2"

    conv_base.TextModel.get_vocab_base_pre = vocab_base_pre_or_gpt2

    modify_tensors = conv_gemma.Gemma3Model.modify_tensors

    def keep_all_embedding_rows(self, data_torch, name, bid):
        if "embed_tokens.weight" in name and isinstance(self, conv_gemma.Gemma4Model):
            # Gemma 3's override trims the rows and shifts the norms; Gemma 4 has no norm shift, so the
            # generic path (no trim) writes the same tensor with every row.
            assert self.norm_shift(name) == 0.0
            yield from super(conv_gemma.Gemma3Model, self).modify_tensors(data_torch, name, bid)
            return
        yield from modify_tensors(self, data_torch, name, bid)

    conv_gemma.Gemma3Model.modify_tensors = keep_all_embedding_rows


def main() -> None:
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"error: no convert_hf_to_gguf.py in {LLAMA_CPP}; set LLAMA_CPP_DIR to build.sh's WORK/llama.cpp")
    sys.path.insert(0, str(LLAMA_CPP))
    import convert_hf_to_gguf
    from conversion import base, gemma

    patch(base, gemma)
    sys.argv[0] = str(LLAMA_CPP / "convert_hf_to_gguf.py")
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()

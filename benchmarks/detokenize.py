"""Streaming detokenization cost per token: incremental (the runtime's Detokenizer, tokenizers' DecodeStream)
vs decoding the whole output again at every token.

    python benchmarks/detokenize.py [--tokens 4000]

Uses the real Gemma 4 tokenizer shipped with edgegen.export.testing (262,144 tokens, byte fallback) on
English, code, CJK and emoji text; checks that both give the same text, and prints microseconds per token for each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    args = parser.parse_args()

    from edgegen.export.testing import write_gemma4_tokenizer
    from edgegen.runtime.detokenize import Detokenizer
    from edgegen.runtime.tokenizer import TextTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_gemma4_tokenizer(Path(tmp))
        tok = TextTokenizer(Path(tmp), {"files": ["tokenizer.json"]})
    sample = (REPO / "README.md").read_text(encoding="utf-8") + " 日本語のテキスト 🦙🚀 😶\u200d🌫️ def f(x): return x\n"
    ids: list[int] = []
    while len(ids) < args.tokens:
        ids += tok.encode(sample, add_special_tokens=False)
    ids = ids[: args.tokens]

    t0 = time.perf_counter()
    stream = Detokenizer(tok)
    streamed = "".join(stream.push(i)[1] for i in ids) + stream.finish()[1]
    incremental = time.perf_counter() - t0

    t0 = time.perf_counter()
    for n in range(1, len(ids) + 1):
        full = tok.decode(ids[:n])
    redecode = time.perf_counter() - t0

    assert streamed == full, "streamed text differs from the full decode"
    print(f"{len(ids)} tokens: incremental {1e6 * incremental / len(ids):.1f} us/token, "
          f"full re-decode {1e6 * redecode / len(ids):.1f} us/token ({redecode / incremental:.0f}x)")


if __name__ == "__main__":
    main()

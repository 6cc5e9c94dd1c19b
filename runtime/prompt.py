"""Prompts with embeddings in them: token ids plus spans of soft tokens (an image's, an audio clip's).

The interface every modality uses to put its tower's output into a prompt (images: runtime/vision.py):

    prompt_ids = [..., boi, PH, PH, ..., PH, eoi, ...]    # the placeholder id repeated n times
    soft = [SoftTokens(start=index of the first PH, embeddings=array [n, hidden] float32, key="sha256 ...")]
    generator.stream_ids(prompt_ids, ..., soft=soft)        # also Generator.stream / generate / chat

`embeddings` are rows in the text model's embedding space (a tower graph's output: what transformers'
Gemma4Model masked-scatters into inputs_embeds); they replace the embeddings of the n placeholder ids. The
target sees the pad id at those positions, as transformers' Gemma4Model feeds it (its per-layer embedding
rows are pad's), attends causally over them (E2B/E4B), and the drafter runs after the prefill unchanged: it
only reads the target's K/V of all positions and the embedding of the last generated token, like
transformers' assisted generation. `key` names the content (e.g. a hash of the image bytes and the
processor settings): a later chat turn reuses the cached K/V of a prompt prefix only where ids and keys
agree, so the same image keeps its K/V across turns and a different image of the same size does not.
A text-only prompt passes no spans and runs exactly as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgegen.runtime.errors import EdgegenError


@dataclass(frozen=True)
class SoftTokens:
    """n embeddings that take the place of prompt ids start .. start+n-1 (see the module docstring)."""

    start: int
    embeddings: np.ndarray  # [n, hidden] float32
    key: str

    @property
    def stop(self) -> int:
        return self.start + len(self.embeddings)


def check_soft(soft: Sequence[SoftTokens], prompt_len: int, hidden: int) -> list[SoftTokens]:
    """The spans sorted by start; one EdgegenError line for spans that do not fit the prompt or the model."""
    spans = sorted(soft, key=lambda s: s.start)
    end = 0
    for s in spans:
        e = s.embeddings
        if not isinstance(e, np.ndarray) or e.ndim != 2 or e.shape[1] != hidden or not len(e):
            raise EdgegenError(f"soft tokens must be an array [n, {hidden}]; got shape "
                               f"{getattr(e, 'shape', type(e).__name__)}")
        if s.start < end or s.stop > prompt_len:
            raise EdgegenError(f"soft tokens at prompt positions {s.start}..{s.stop - 1} overlap another span or "
                               f"pass the prompt's end ({prompt_len} tokens)")
        if not np.isfinite(e).all():
            raise EdgegenError("soft tokens hold NaN or infinite values; the media encoder failed")
        end = s.stop
    return spans


def identity(prompt_ids: list[int], soft: Sequence[SoftTokens]) -> list:
    """What each prompt position holds, for KV reuse: the id, or (key, i) at a soft token's position."""
    out: list = list(prompt_ids)
    for s in soft:
        out[s.start:s.stop] = [(s.key, i) for i in range(len(s.embeddings))]
    return out


def soft_rows(soft: Sequence[SoftTokens], start: int, stop: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The soft tokens among prompt positions start..stop-1: (rows relative to start [M] int64, [M, H]);
    None if there are none."""
    rows, embeds = [], []
    for s in soft:
        lo, hi = max(s.start, start), min(s.stop, stop)
        if lo < hi:
            rows.append(np.arange(lo - start, hi - start, dtype=np.int64))
            embeds.append(np.asarray(s.embeddings[lo - s.start:hi - s.start], dtype=np.float32))
    if not rows:
        return None
    return np.concatenate(rows), np.concatenate(embeds)


def place(ids: list[int], token_id: int, media: Sequence[tuple[str, int, Callable[[], np.ndarray]]],
          cache: dict | None, what: str, items: str) -> tuple[list[SoftTokens], float]:
    """Soft tokens for media at the runs of `token_id` in an expanded prompt `ids`, one run per item in order.
    media: (key, soft-token count, encode) per item; `encode` runs only for keys not in `cache` (key -> soft
    tokens, filled here). Returns the spans and the seconds spent encoding (0 if every item was cached). A run count
    or length that does not match the items is one EdgegenError line naming `what` ("image") and `items`."""
    runs, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == token_id:
            j += 1
        if j > i:
            runs.append((i, j - i))
        i = max(j, i + 1)
    if [n for _, n in runs] != [n for _, n, _ in media]:
        raise EdgegenError(f"the prompt's {what} placeholders ({[n for _, n in runs]}) do not match the {items}' "
                           f"soft tokens ({[n for _, n, _ in media]})")
    cache = {} if cache is None else cache
    spans, seconds = [], 0.0
    for (start, _), (key, _, make) in zip(runs, media, strict=True):
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = make()
            seconds += time.perf_counter() - t0
        spans.append(SoftTokens(start, cache[key], key))
    return spans, seconds


def encode(session, feeds: dict[str, np.ndarray], what: str) -> np.ndarray:
    """A media tower graph's soft tokens [T, hidden] (output SOFT_TOKENS) for `feeds`; a failed run or a
    non-finite result is one EdgegenError line naming `what` (e.g. "vision")."""
    from edgegen.runtime.manifest import SOFT_TOKENS

    try:
        out = session.run([SOFT_TOKENS], feeds)[0]
    except Exception as exc:  # onnxruntime's own types
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise EdgegenError(f"running the {what} graph failed ({first}); re-export the bundle") from None
    if not np.isfinite(out).all():
        raise EdgegenError(f"the {what} graph returned NaN or infinite values; re-export the bundle")
    return out

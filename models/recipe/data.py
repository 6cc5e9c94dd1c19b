"""The demo pair's training text: offline text every Python installation carries.

The corpus is the standard library's own `.py` sources (recursively; without test suites, IDLE and
site-packages) plus the pydoc topics (`pydoc_data.topics.topics`). It is split by *file*, so held-out
text is code the model never saw a line of: sort the files, hold out every 20th; the pydoc topics all
go to training. `pydoc_data/` itself is skipped in the file walk because its `topics.py` *is* the topics
dict (it would be counted twice and could land in the held-out split).

The text depends on the Python version that runs this module (the demo was built with the one recorded
in models/README.md). Tokenized arrays are cached under build/demo-data/, keyed by the tokenizer file
and the file list, so a different Python or tokenizer never reuses a stale cache.

Each document is encoded as `<bos> tokens <eos>` and the documents are concatenated into one uint16
array per split (the vocabulary is far below 65536).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO / "build" / "demo-data"
DEMO_TOKENIZER = REPO / "models" / "demo" / "target" / "tokenizer.json"
HELDOUT_EVERY = 20
_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "pydoc_data", "__pycache__"}


def stdlib_root() -> Path:
    return Path(os.__file__).parent


def corpus_files() -> list[Path]:
    """The standard library's `.py` files, sorted by path relative to the library root."""
    root = stdlib_root()
    files = [p for p in root.rglob("*.py") if not _SKIPPED_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out): every `HELDOUT_EVERY`-th file of the sorted list is held out."""
    files = corpus_files()
    heldout = [p for i, p in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [p for i, p in enumerate(files) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    return train, heldout


def pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_texts() -> list[str]:
    train, _ = split_files()
    return [_read(p) for p in train] + pydoc_topics()


def heldout_texts() -> list[str]:
    _, heldout = split_files()
    return [_read(p) for p in heldout]


def encode_documents(texts: list[str], tokenizer_path: Path = DEMO_TOKENIZER) -> np.ndarray:
    """`<bos> doc <eos>` for every document, concatenated (the tokenizer's post-processor adds `<bos>`)."""
    from tokenizers import Tokenizer

    from edgegen.export.testing import EOS_ID

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.uint16)


def _cache_key(split: str, tokenizer_path: Path) -> str:
    h = hashlib.sha256(Path(tokenizer_path).read_bytes())
    h.update(f"{split} {HELDOUT_EVERY} {sys.version_info[:3]}".encode())
    root = stdlib_root()
    for p in corpus_files():
        h.update(f"{p.relative_to(root).as_posix()} {p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _cached_ids(split: str, texts_fn, tokenizer_path: Path) -> np.ndarray:
    path = CACHE_DIR / f"{split}-{_cache_key(split, tokenizer_path)}.npy"
    if path.is_file():
        return np.load(path)
    ids = encode_documents(texts_fn(), tokenizer_path)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, ids)
    tmp.replace(path)
    return ids


def train_ids(tokenizer_path: Path = DEMO_TOKENIZER) -> np.ndarray:
    """Token ids of the training split (uint16), cached under build/demo-data/."""
    return _cached_ids("train", train_texts, tokenizer_path)


def heldout_ids(tokenizer_path: Path = DEMO_TOKENIZER) -> np.ndarray:
    """Token ids of the held-out split (uint16), cached under build/demo-data/."""
    return _cached_ids("heldout", heldout_texts, tokenizer_path)

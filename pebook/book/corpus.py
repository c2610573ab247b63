"""The book's training corpus: the King James Version of the Bible, shipped with pebook.

The text (1611, public domain) lies in ``pebook/book/data/kjv.txt.xz``: 4,152,016 ASCII characters
in 1,189 chapters, one verse per line (verse numbers stripped), each chapter opened by its
heading (``"Genesis 1"``) and separated from the next by a blank line. Its provenance is
described in ``pebook/book/data/README.md``. Nothing is downloaded.

* **Tokens** are bytes: ``encode(text)`` is ``list(text.encode("ascii"))``, so the vocabulary
  has :data:`VOCAB_SIZE` = 256 entries, of which the corpus uses 73.
* **Split**: chapter ``i`` (0-based, in canonical order Genesis 1 … Revelation 22) is held out
  when ``i % 10 == 9`` — every tenth chapter, 118 of 1,189 — so that the held-out text spans the
  whole book and shares its style. The split shares no chapter with the training text, but
  not every sentence is new: through parallel passages (Nehemiah 7 and Ezra 2, Genesis 10 and
  1 Chronicles 1) and repeated formulas, 36 distinct held-out verses, 45 of its 3,057 verse lines
  (1.5 %), also occur verbatim in training. ``tests/book/test_corpus.py`` counts them.
* **Batches**: :func:`random_windows` draws training windows at random offsets from a
  ``torch.Generator`` (deterministic given its seed). Held-out scoring is in
  :mod:`pebook.book.evaluation`.
"""

from __future__ import annotations

import lzma
from functools import lru_cache
from importlib import resources

import torch

from .._checks import check_int, check_int_tensor

__all__ = [
    "VOCAB_SIZE",
    "HELD_OUT_EVERY",
    "CORPUS_FILE",
    "load_text",
    "chapters",
    "split_text",
    "encode",
    "decode",
    "corpus_tokens",
    "random_windows",
]

VOCAB_SIZE = 256
HELD_OUT_EVERY = 10
CORPUS_FILE = "kjv.txt.xz"
_SPLITS = ("train", "heldout")


@lru_cache(maxsize=1)
def load_text() -> str:
    """The whole corpus as one ``str`` (read once through ``importlib.resources``, then cached)."""
    data = resources.files("pebook.book").joinpath("data", CORPUS_FILE).read_bytes()
    return lzma.decompress(data).decode("ascii")


def chapters(text: str | None = None) -> list[str]:
    """The chapters of ``text`` (default: the corpus), each starting with its heading line."""
    text = load_text() if text is None else text
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return [c for c in text.split("\n\n") if c]


def split_text(held_out_every: int = HELD_OUT_EVERY) -> tuple[str, str]:
    """``(train, heldout)`` text: chapter ``i`` is held out iff ``i % held_out_every == held_out_every - 1``.

    Chapters are joined with the blank line that separates them in the corpus.
    """
    held_out_every = check_int("held_out_every", held_out_every, minimum=2)
    train, heldout = [], []
    for i, chapter in enumerate(chapters()):
        (heldout if i % held_out_every == held_out_every - 1 else train).append(chapter)
    return "\n\n".join(train) + "\n", "\n\n".join(heldout) + "\n"


def encode(text: str) -> torch.Tensor:
    """Byte-level tokens of an ASCII ``text``: a ``torch.long`` tensor with values in ``[0, 256)``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"text must be ASCII (the corpus is), got {text[err.start : err.end]!r} at {err.start}"
        ) from err
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else torch.empty(0, dtype=torch.long)


def decode(tokens: torch.Tensor) -> str:
    """Inverse of :func:`encode`."""
    check_int_tensor("tokens", tokens, ndim=1)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > 127):
        raise ValueError(
            f"tokens must be ASCII byte values in [0, 128), got [{int(tokens.min())}, {int(tokens.max())}]"
        )
    return bytes(tokens.tolist()).decode("ascii")


@lru_cache(maxsize=2)
def corpus_tokens(split: str) -> torch.Tensor:
    """Tokens of the ``"train"`` or ``"heldout"`` split (cached; do not modify in place)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    train, heldout = split_text()
    return encode(train if split == "train" else heldout)


def random_windows(
    tokens: torch.Tensor, batch_size: int, length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: ``batch_size`` windows of ``length + 1`` tokens at random offsets.

    Returns ``(inputs, targets)``, both ``(batch_size, length)``; ``targets`` is ``inputs``
    shifted by one token. The offsets come from ``generator`` only, so a seeded generator
    gives the same batches on every run (and a saved generator state resumes them).
    """
    check_int_tensor("tokens", tokens, ndim=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    length = check_int("length", length, minimum=1)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if tokens.numel() < length + 1:
        raise ValueError(f"tokens holds {tokens.numel()} tokens, fewer than length + 1 = {length + 1}")
    starts = torch.randint(0, tokens.numel() - length, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s : s + length + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]

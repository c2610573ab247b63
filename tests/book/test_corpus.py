"""pebook.book.corpus: the book's training text (the King James Bible), its split and its tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook.book import corpus


def test_corpus_is_the_stated_text():
    text = corpus.load_text()
    assert len(text) == 4_152_016
    assert len(set(text)) == 73 and text.isascii()
    chapters = corpus.chapters()
    assert len(chapters) == 1189  # the KJV's chapter count
    assert chapters[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    assert chapters[-1].startswith("Revelation 22\n")
    assert text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def test_split_is_deterministic_disjoint_and_every_tenth_chapter():
    train_text, heldout_text = corpus.split_text()
    assert (train_text, heldout_text) == corpus.split_text()
    headings = lambda text: [c.split("\n", 1)[0] for c in corpus.chapters(text)]  # noqa: E731
    all_headings = headings(corpus.load_text())
    train_h, held_h = headings(train_text), headings(heldout_text)
    assert len(set(all_headings)) == 1189
    assert held_h == all_headings[9::10] and len(held_h) == 118
    assert set(train_h).isdisjoint(held_h) and len(train_h) + len(held_h) == 1189
    assert corpus.corpus_tokens("train").numel() == 3_751_682
    assert corpus.corpus_tokens("heldout").numel() == 400_334
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.corpus_tokens("test")
    with pytest.raises(ValueError, match="held_out_every"):
        corpus.split_text(1)


def test_heldout_verses_repeated_in_training_are_counted_as_the_docstring_says():
    train, heldout = corpus.split_text()

    def verses(text):
        return [line for chapter in text.split("\n\n") for line in chapter.split("\n")[1:] if line]

    train_verses = set(verses(train))
    heldout_verses = verses(heldout)
    repeated = [v for v in heldout_verses if v in train_verses]
    assert (len(heldout_verses), len(set(repeated)), len(repeated)) == (3057, 36, 45)
    assert "36 distinct held-out verses, 45 of its 3,057" in corpus.__doc__.replace("\n  ", " ")


def test_tokenisation_round_trip_and_errors():
    text = corpus.chapters()[0][:500]
    tokens = corpus.encode(text)
    assert tokens.dtype == torch.long and tokens.shape == (500,)
    assert tokens.tolist() == list(text.encode("ascii"))
    assert corpus.decode(tokens) == text
    assert corpus.encode("").numel() == 0
    with pytest.raises(ValueError, match="ASCII"):
        corpus.encode("naïve")
    with pytest.raises(TypeError, match="text must be a str"):
        corpus.encode(b"bytes")
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        corpus.decode(torch.tensor([65, 200]))


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=50))
def test_tokenisation_round_trip_property(text):
    assert corpus.decode(corpus.encode(text)) == text


def test_random_windows_shapes_shift_and_determinism():
    tokens = corpus.corpus_tokens("train")
    x1, y1 = corpus.random_windows(tokens, 5, 32, torch.Generator().manual_seed(3))
    x2, y2 = corpus.random_windows(tokens, 5, 32, torch.Generator().manual_seed(3))
    assert x1.shape == y1.shape == (5, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    with pytest.raises(TypeError, match="generator"):
        corpus.random_windows(tokens, 5, 32, 3)
    with pytest.raises(ValueError, match="fewer than length"):
        corpus.random_windows(tokens[:10], 1, 10, torch.Generator())

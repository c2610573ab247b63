"""Support code for the book's chapters; not part of the library API.

The library (``import pebook``: the encodings, attention, ``TinyLM``, generation, RoPE scaling)
does not import anything from here. This subpackage holds what the chapters and the book's tooling
use on top of it, each imported explicitly where it is needed:

* :mod:`pebook.book.plotting` — the figures' helpers (imports matplotlib)
* :mod:`pebook.book.errata` — runs the source documents' code listings (``seed_listings/``)
* :mod:`pebook.book.corpus` — the training corpus shipped in ``data/`` (the King James Bible)
* :mod:`pebook.book.training` — a small training and evaluation loop for ``TinyLM``
* :mod:`pebook.book.evaluation` — every held-out token scored in non-overlapping or sliding windows
* :mod:`pebook.book.ngram` — byte n-gram baselines (interpolated Witten–Bell)
* :mod:`pebook.book.decoding_cost` — the bandwidth cost model of decoding (weights and KV cache read per token)
* :mod:`pebook.book.experiments` — experiments that train models (``python -m pebook.book.experiments.<name>``)
* :mod:`pebook.book.bench` — the benchmark of ``make bench`` (``python -m pebook.book.bench``)

This ``__init__`` imports nothing, so that importing one of them loads only what it needs.
"""

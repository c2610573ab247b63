"""Experiments that train models: runnable as ``python -m pebook.book.experiments.<name>``.

* :mod:`pebook.book.experiments.length_extrapolation` — train short, test long: one ``TinyLM`` per
  positional encoding trained at one length and evaluated at up to 16× that length (Press, Smith
  & Lewis 2022, Fig. 1), to the papers' standard: several seeds, non-overlapping and sliding
  evaluation of every held-out byte, paired per-token differences by context, models trained at
  the longer lengths, n-gram baselines, and results that merge across runs of different
  encodings.
* :mod:`pebook.book.experiments.retrieval` — passkey retrieval: does a model trained at length
  ``L`` reach a token more than ``L`` positions back, at distances binned up to 16 ``L``?
* :mod:`pebook.book.experiments.context_extension` — RoPE context extension with the same
  protocol: every rule (transformers' variants) at s = 2, 4, 8, with and without fine-tuning, a
  fine-tuning control, short-input regression, dynamic rules evaluated token by token, passkey
  retrieval, seeds.
"""

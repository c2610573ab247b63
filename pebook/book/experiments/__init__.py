"""Experiments that train models: runnable as ``python -m pebook.book.experiments.<name>``.

* :mod:`pebook.book.experiments.extrapolation` — train short, test long: one ``TinyLM`` per positional
  encoding trained at one length and evaluated at up to 16× that length (the experiment of
  Press, Smith & Lewis 2022, Fig. 1), plus RoPE context extension.
"""

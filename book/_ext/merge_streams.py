"""``nb_merge_streams`` without corrupting the executed notebook (myst-nb 1.4).

With ``nb_merge_streams: true`` (``_config.yml``), myst-nb shows everything a cell printed
to stdout (or stderr) in one box, however the kernel flushed it. It does so with
``myst_nb.core.utils.coalesce_streams``, which appends the later stream outputs to the
*first output object itself* and returns a new list; the notebook that myst-nb then writes
to ``_build/jupyter_execute/`` (compared with tests/notebooks by ``make book``, and offered
as the page's .ipynb download) keeps that grown first output *and* the later ones, so the
text after the first flush appears twice.

This extension makes myst-nb merge a copy of the outputs: the page shows one box, and the
executed notebook keeps the outputs as the kernel sent them (nbval and ``tests/nbrefs.py
compare`` merge streams themselves before comparing).
"""

from __future__ import annotations

import copy

from sphinx.application import Sphinx


def _patch_myst_nb() -> None:
    from myst_nb.core import render

    merge = render.coalesce_streams
    if getattr(merge, "pebook_copies_outputs", False):
        return

    def merge_a_copy(outputs):
        return merge(copy.deepcopy(outputs))

    merge_a_copy.pebook_copies_outputs = True
    render.coalesce_streams = merge_a_copy


def setup(app: Sphinx) -> dict:
    app.setup_extension("myst_nb")
    _patch_myst_nb()
    return {"parallel_read_safe": True, "parallel_write_safe": True}

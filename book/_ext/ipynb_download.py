"""Offer every executed chapter as an ``.ipynb`` in sphinx-book-theme's download menu.

The theme adds a ".ipynb" entry for a MyST text notebook only when a launch service
(Binder, Colab, ...) is configured, and launch links need a public repository URL. This
extension does just the download part: for each page that is a notebook, it copies the
notebook that MyST-NB executed (``_build/jupyter_execute/<page>.ipynb``) next to the page
sources (``_build/html/_sources/<page>.ipynb``) and tells the theme where it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)


def _add_ipynb_source(app: Sphinx, pagename: str, templatename, context, doctree) -> None:
    if doctree is None or context.get("ipynb_source"):
        return
    if "kernelspec" not in app.env.metadata.get(pagename, {}):
        return  # a plain Markdown page, not a notebook
    outdir = Path(app.outdir)
    executed = outdir.parent / "jupyter_execute" / f"{pagename}.ipynb"
    if not executed.is_file():
        logger.warning(f"no executed notebook for {pagename} at {executed}", location=pagename)
        return
    target = outdir / "_sources" / f"{pagename}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(executed, target)
    context["ipynb_source"] = f"{pagename}.ipynb"


def setup(app: Sphinx) -> dict:
    # Before sphinx-book-theme builds the header buttons (priority 501).
    app.connect("html-page-context", _add_ipynb_source, priority=500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

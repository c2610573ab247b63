"""Serve MathJax from the built site itself, so that no page loads anything from the network.

``_config.yml`` sets ``mathjax_path`` to a path relative to ``_static/``
(``mathjax/tex-mml-chtml.js``). When the HTML build has finished, this extension copies
MathJax 3 there from the pinned PyPI package ``django-static-mathjax`` (an unmodified copy
of the MathJax 3.2.2 release, importable as ``mathjax``; requirements.txt): the combined
component that ``mathjax_path`` names, the components it loads on demand (TeX extensions,
the CommonHTML output with its fonts, the menu and accessibility tools) and MathJax's
LICENSE. MathJax finds those next to its own script, so every request stays on the site.

A ``mathjax_path`` that is a URL is an error: the book must not load MathJax from a CDN.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ConfigError
from sphinx.util import logging
from sphinx.util.fileutil import copy_asset

logger = logging.getLogger(__name__)

# Combined components of the release other than the one that mathjax_path names: not copied.
_BUNDLES = (
    "tex-chtml.js",
    "tex-chtml-full.js",
    "tex-chtml-full-speech.js",
    "tex-mml-chtml.js",
    "tex-mml-svg.js",
    "tex-svg.js",
    "tex-svg-full.js",
    "mml-chtml.js",
    "mml-svg.js",
    "node-main.js",
    "latest.js",  # would look for the newest MathJax on a CDN
)


def mathjax_release() -> Path:
    """The ``es5/`` folder of the MathJax release that django-static-mathjax installs."""
    import mathjax  # django-static-mathjax

    root = Path(mathjax.__file__).parent / "static" / "mathjax"
    if not (root / "es5").is_dir():
        raise ConfigError(f"django-static-mathjax has no MathJax release at {root}; reinstall requirements.txt")
    return root / "es5"


def _check_config(app: Sphinx, config) -> None:
    path = config.mathjax_path or ""
    if "://" in path or path.startswith("//") or posixpath.isabs(path):
        raise ConfigError(
            f"mathjax_path = {path!r}: the book serves MathJax itself; give a path under _static/, "
            "e.g. mathjax/tex-mml-chtml.js"
        )
    script = posixpath.basename(path)
    if script not in _BUNDLES or script == "latest.js" or not (mathjax_release() / script).is_file():
        raise ConfigError(f"mathjax_path = {path!r}: MathJax 3 has no combined component {script!r}")


def _copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    script = posixpath.basename(app.config.mathjax_path)
    target = Path(app.outdir) / "_static" / posixpath.dirname(app.config.mathjax_path)
    release = mathjax_release()

    def excluded(relative: str) -> bool:
        relative = posixpath.normpath(relative.replace("\\", "/"))  # "./tex-svg.js" -> "tex-svg.js"
        return relative in _BUNDLES and relative != script

    copy_asset(release, target, excluded=excluded)
    copy_asset(release.parent / "LICENSE", target)
    logger.info(f"MathJax 3 (django-static-mathjax) copied to {target.relative_to(app.outdir)}")


def setup(app: Sphinx) -> dict:
    app.setup_extension("sphinx.ext.mathjax")
    app.connect("config-inited", _check_config)
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

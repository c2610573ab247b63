"""nbval runs of the reference notebooks: every kernel gets matplotlib's inline backend.

The book build and ``make bless`` run chapters in kernels whose figures are displayed
inline (``image/png`` + ``text/plain`` outputs, stored in the references). A kernel
inherits the environment of the pytest process, and an ``MPLBACKEND=Agg`` there (set by
a shell or by tests/conftest.py for the unit tests) would make ``plt.show()`` display
nothing, so nbval would report the figures as missing. nbval starts a notebook's kernel
while setting up the notebook's first cell, so the backend is pinned for exactly that
moment and restored after.
"""

from __future__ import annotations

import os

import pytest

INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    saved = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = INLINE_BACKEND
    try:
        return (yield)
    finally:
        if saved is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = saved

"""The public API: everything exported exists, and every exported name is exercised by a test."""

import pathlib
import re

import pebook

TESTS = pathlib.Path(__file__).parent


def test_exports_exist():
    missing = [name for name in pebook.__all__ if not hasattr(pebook, name)]
    assert missing == []
    assert len(set(pebook.__all__)) == len(pebook.__all__)


def test_version_matches_pyproject():
    pyproject = (TESTS.parent / "pyproject.toml").read_text()
    assert pebook.__version__ == re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.M).group(1)


def test_every_export_is_used_by_some_test():
    """A new public name without a test fails here (its name must appear in a tests/test_*.py)."""
    sources = "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != "test_package.py")
    untested = [name for name in pebook.__all__ if not re.search(rf"\b{re.escape(name)}\b", sources)]
    assert untested == []


def test_encodings_constant():
    assert pebook.ENCODINGS == ("none", "sinusoidal", "learned", "shaw", "t5", "rope", "alibi")

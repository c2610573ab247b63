"""The public API: everything exported exists, and every exported name is exercised by a test."""

import pathlib
import re
import subprocess
import sys

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
    """A new public name without a test fails here (its name must appear in a tests/**/test_*.py)."""
    sources = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py") if p != TESTS / "test_package.py")
    untested = [name for name in pebook.__all__ if not re.search(rf"\b{re.escape(name)}\b", sources)]
    assert untested == []


def test_encodings_registry():
    """``ENCODINGS`` maps each name to its encoding class, whose ``name`` is that key."""
    assert isinstance(pebook.ENCODINGS, dict)
    classics = ("none", "sinusoidal", "learned", "shaw", "t5", "rope", "alibi")
    assert tuple(pebook.ENCODINGS)[: len(classics)] == classics  # new encodings are appended
    for name, cls in pebook.ENCODINGS.items():
        assert isinstance(cls, type) and issubclass(cls, pebook.PositionalEncoding), name
        assert cls.name == name and cls.place in pebook.PLACES, name


def test_import_is_light():
    """``import pebook`` is the library only: no matplotlib, no book support code, no data."""
    code = "import pebook, sys; assert 'matplotlib' not in sys.modules and 'pebook.book' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr

"""Run the source documents' code listings, so the errata can show what they really do.

The listings in the folder ``pebook/book/seed_listings/`` (:data:`LISTINGS_DIR`) are quoted verbatim
from the five source documents (only line breaks restored where a web scrape had collapsed them).
They are stored as ``.txt`` files, not ``.py``: they are quoted data, not pebook code, and one of
them (``002_2``, truncated mid-call in its source) is not even valid Python. :func:`run_listing`
executes one in a fresh namespace, compiled under its own file name so that tracebacks point into
it, and returns a :class:`ListingRun`: the exception (type, message, line in the listing) if any,
the captured stdout, and the namespace, so the book can go on to probe the classes a listing
defined.

Nothing is downloaded. A listing that moves tensors to CUDA raises on a CPU-only machine (the
book is built with ``CUDA_VISIBLE_DEVICES=``), and that exception *is* the finding. To show the
next bug after it, ``cuda_to_cpu=True`` rewrites the listing's device strings (``'cuda'``,
``"cuda:0"``, ``.cuda()``) to ``device`` before compiling. That rewrite, ``patches`` (exact text
replacements) and ``overrides`` (names injected into the namespace, e.g. a missing ``math``) are
OUR modifications, never the source's, and each one is recorded in ``ListingRun.modifications``.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..utils import seed_everything

__all__ = ["LISTINGS_DIR", "LISTING_SUFFIX", "ListingRun", "list_listings", "run_listing"]

LISTINGS_DIR = Path(__file__).with_name("seed_listings")
LISTING_SUFFIX = ".txt"  # quoted data, not importable code
_CUDA_STRING = re.compile(r"""(['"])cuda(?::\d+)?\1""")


@dataclass
class ListingRun:
    """What happened when a listing ran. ``error_line`` is a line number in the listing's file."""

    name: str
    path: Path
    error_type: str | None = None
    error_message: str | None = None
    error_line: int | None = None
    error_source: str | None = None
    stdout: str = ""
    namespace: dict = field(default_factory=dict, repr=False)
    modifications: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the listing ran to the end without an exception."""
        return self.error_type is None

    @property
    def error(self) -> str | None:
        """``"Type: message"``, or None."""
        return None if self.ok else f"{self.error_type}: {self.error_message}"


def list_listings() -> list[str]:
    """Names of the quoted listings, e.g. ``"003_3_rotary_attention"``, in document order.

    A name is the stem of a file ``LISTINGS_DIR / f"{name}{LISTING_SUFFIX}"``.
    """
    return sorted(p.stem for p in LISTINGS_DIR.glob(f"[0-9]*{LISTING_SUFFIX}"))


def _resolve(name: str) -> Path:
    stem = Path(name).stem
    matches = [n for n in list_listings() if n == stem] or [n for n in list_listings() if n.startswith(stem)]
    if len(matches) != 1:
        raise ValueError(f"{name!r} matches {matches or 'no listing'}; choose one of {list_listings()}")
    return LISTINGS_DIR / f"{matches[0]}{LISTING_SUFFIX}"


def run_listing(
    name: str,
    *,
    device: str = "cpu",
    overrides: dict | None = None,
    patches: dict[str, str] | None = None,
    cuda_to_cpu: bool = False,
    capture_stdout: bool = True,
    max_stdout: int = 4000,
    seed: int | None = 0,
) -> ListingRun:
    """Execute listing ``name`` (a name from :func:`list_listings`, or a unique prefix such as ``"003_3"``).

    ``overrides``: names put into the namespace before the listing runs. ``patches``: exact
    ``{old: new}`` text replacements, each ``old`` must occur exactly once. ``cuda_to_cpu``:
    replace the listing's CUDA device strings by ``device``. ``seed``: seeds Python, NumPy and
    torch first (None: don't). Exceptions raised by the listing are caught and reported.
    """
    path = _resolve(name)
    source = path.read_text(encoding="utf-8")
    modifications = []
    for old, new in (patches or {}).items():
        if source.count(old) != 1:
            raise ValueError(f"patch text {old!r} occurs {source.count(old)} times in {path.name}, not once")
        source = source.replace(old, new)
        modifications.append(f"patched {old!r} -> {new!r}")
    if cuda_to_cpu:
        rewritten = _CUDA_STRING.sub(repr(device), source).replace(".cuda()", f".to({device!r})")
        if rewritten != source:
            modifications.append(f"CUDA device strings replaced by {device!r}")
        source = rewritten
    namespace = {"__name__": f"seed_listing_{path.stem}", "__file__": str(path), "__builtins__": builtins}
    for key, value in (overrides or {}).items():
        namespace[key] = value
        modifications.append(f"injected name {key!r}")
    if seed is not None:
        seed_everything(seed)

    run = ListingRun(path.stem, path, namespace=namespace, modifications=tuple(modifications))
    buffer = io.StringIO()
    redirect = contextlib.redirect_stdout(buffer) if capture_stdout else contextlib.nullcontext()
    try:
        code = compile(source, str(path), "exec")
        with redirect:
            exec(code, namespace)
    except Exception as err:  # the listing's own failure is the result we report
        run.error_type, run.error_message = type(err).__name__, str(err)
        if isinstance(err, SyntaxError):
            run.error_message, run.error_line = err.msg, err.lineno
        else:
            frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == str(path)]
            run.error_line = frames[-1].lineno if frames else None
        if run.error_line is not None:
            run.error_source = source.splitlines()[run.error_line - 1].strip()
    out = buffer.getvalue()
    run.stdout = out if len(out) <= max_stdout else f"{out[:max_stdout]}… [{len(out) - max_stdout} more characters]"
    return run

#!/usr/bin/env python
"""Reference notebooks for the chapters' regression tests (driven by the Makefile).

Every chapter of the book that has code cells (a MyST text notebook listed in ``_toc.yml``)
has an executed reference ``tests/notebooks/<chapter>.ipynb``. ``make test`` runs nbval on
those references: it re-executes each one on the CPU and compares the new outputs with the
stored ones.

    python tests/nbrefs.py check
        Fail, naming the chapter, unless every chapter has a reference and every reference a
        chapter, each reference's cells (code and Markdown, with their metadata) equal what
        jupytext makes of the chapter today, and each of its code cells has been executed.
        Also fail if the "python3" kernel is not this environment's Python.

    python tests/nbrefs.py bless [CHAPTER ...]
        Execute the chapters (all by default) from scratch on the CPU, in book/ as the book
        build does, and write the references, stripped of volatile metadata so that
        re-blessing unchanged chapters changes no byte.

    python tests/nbrefs.py compare BUILD_DIR [--sanitize-with CFG]
        Compare the notebooks that the book build executed (BUILD_DIR/book/<chapter>.ipynb,
        i.e. _build/jupyter_execute) with the references, with nbval's own comparison (its
        markers, sanitizer and report) but without executing anything a second time.

Run it with the project's virtual environment: ``.venv/bin/python tests/nbrefs.py ...``.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
REFS = ROOT / "tests" / "notebooks"
TOC = ROOT / "_toc.yml"
KERNEL = "python3"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"  # what ipykernel picks by default
PAGE_SUFFIXES = (".md", ".ipynb")
# Cell metadata that execution adds and that says nothing about the chapter's inputs.
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled")
BLESS_HINT = "run `make bless` and review the diff of tests/notebooks/"


@dataclass(frozen=True)
class Chapter:
    name: str  # path under book/ without suffix: "quickstart"
    source: Path  # book/quickstart.md
    docname: str  # Sphinx docname: "book/quickstart"

    @property
    def reference(self) -> Path:
        return REFS / f"{self.name}.ipynb"

    def __str__(self) -> str:
        return self.source.relative_to(ROOT).as_posix()


class Problems(list):
    def report(self, what: str) -> int:
        if not self:
            return 0
        print(f"{what}: {len(self)} problem(s)", file=sys.stderr)
        for problem in self:
            print(f"  - {problem}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- chapters


def _page_file(docname: str) -> Path:
    for suffix in PAGE_SUFFIXES + (".rst",):
        path = ROOT / f"{docname}{suffix}"
        if path.is_file():
            return path
    raise SystemExit(f"_toc.yml lists {docname!r}, but no {docname}.md or .ipynb exists")


def _is_notebook(path: Path) -> bool:
    if path.suffix == ".ipynb":
        return True
    if path.suffix != ".md":
        return False
    from myst_nb.core.read import is_myst_markdown_notebook  # the book build's own rule

    return is_myst_markdown_notebook(path.read_text(encoding="utf8"))


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def toc_chapters(problems: Problems | None = None) -> list[Chapter]:
    """The pages of _toc.yml that are notebooks with at least one code cell, in toc order."""
    from sphinx_external_toc.parsing import parse_toc_yaml

    site_map = parse_toc_yaml(TOC)
    if site_map.globs():
        raise SystemExit("_toc.yml uses glob entries; list every chapter explicitly")
    chapters = []
    for docname in site_map:
        path = _page_file(docname)
        if not _is_notebook(path):
            if problems is not None and re.search(r"^\s*```+\s*\{code-cell\}", path.read_text("utf8"), re.M):
                problems.append(
                    f"{path.relative_to(ROOT)} has {{code-cell}} blocks but no jupytext MyST front matter, "
                    "so the book would not execute it"
                )
            continue
        try:
            relative = path.relative_to(BOOK)
        except ValueError:
            raise SystemExit(f"chapter {path.relative_to(ROOT)} is not under book/") from None
        if _code_cells(jupytext.read(path)):
            chapters.append(Chapter(relative.with_suffix("").as_posix(), path, docname))
    return chapters


def select(chapters: list[Chapter], names: list[str]) -> list[Chapter]:
    if not names:
        return chapters
    by_key = {}
    for chapter in chapters:
        for key in (chapter.name, str(chapter), chapter.docname):
            by_key[key] = chapter
    unknown = [name for name in names if name not in by_key]
    if unknown:
        raise SystemExit(
            f"not a chapter with code in _toc.yml: {', '.join(unknown)} "
            f"(chapters: {', '.join(c.name for c in chapters)})"
        )
    return [by_key[name] for name in names]


def reference_files() -> list[Path]:
    return sorted(p for p in REFS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


# ----------------------------------------------------------------------------- kernel


def check_kernel() -> str | None:
    """None if the "python3" kernel runs this interpreter (the .venv's), else the problem."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        return f"no {KERNEL!r} kernel is installed; is ipykernel installed in {sys.prefix}?"
    executable = spec.argv[0] if spec.argv else ""
    # jupyter_client runs a kernelspec whose command is a bare "python" with sys.executable.
    bare = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    if executable in bare or Path(executable).absolute() == Path(sys.executable).absolute():
        return None
    return (
        f"the {KERNEL!r} kernel runs {executable} (kernelspec in {spec.resource_dir}), "
        f"not this environment's {sys.executable}; remove that kernelspec or set JUPYTER_PREFER_ENV_PATH=1"
    )


# ----------------------------------------------------------------------------- check


def _inputs(nb) -> list[tuple[str, str, dict]]:
    cells = []
    for cell in nb.cells:
        metadata = {k: v for k, v in cell.metadata.items() if k not in VOLATILE_CELL_METADATA}
        cells.append((cell.cell_type, cell.source, metadata))
    return cells


def _describe_difference(expected, found) -> str:
    for index, (want, have) in enumerate(zip(expected, found)):
        if want == have:
            continue
        if want[0] != have[0]:
            return f"cell {index} is a {have[0]} cell in the reference but a {want[0]} cell in the chapter"
        if want[1] != have[1]:
            diff = difflib.unified_diff(
                have[1].splitlines(), want[1].splitlines(), "reference", "chapter", lineterm="", n=1
            )
            shown = list(diff)[2:14]
            return f"cell {index} ({want[0]}) differs:\n      " + "\n      ".join(shown)
        return f"cell {index} ({want[0]}) has metadata {want[2]} in the chapter but {have[2]} in the reference"
    return f"the chapter has {len(expected)} cells, the reference {len(found)}"


def check(_args) -> int:
    problems = Problems()
    kernel_problem = check_kernel()
    if kernel_problem:
        problems.append(kernel_problem)
    chapters = toc_chapters(problems)
    expected = {chapter.reference for chapter in chapters}
    for chapter in chapters:
        ref = chapter.reference
        if not ref.is_file():
            problems.append(f"{chapter}: no reference {ref.relative_to(ROOT)}; {BLESS_HINT}")
            continue
        reference = nbformat.read(ref, as_version=4)
        # What `jupytext --update` would put in the reference: the chapter's cells of today.
        current = jupytext.read(chapter.source)
        if _inputs(reference) != _inputs(current):
            difference = _describe_difference(_inputs(current), _inputs(reference))
            problems.append(f"{chapter}: reference {ref.relative_to(ROOT)} is stale, {difference}\n    -> {BLESS_HINT}")
            continue
        unrun = [i for i, cell in enumerate(_code_cells(reference)) if cell.get("execution_count") is None]
        if unrun:
            problems.append(
                f"{chapter}: code cell(s) {unrun} of {ref.relative_to(ROOT)} were never executed, "
                f"so nbval would not compare them; {BLESS_HINT}"
            )
    for ref in reference_files():
        if ref not in expected:
            problems.append(
                f"{ref.relative_to(ROOT)} belongs to no chapter with code in _toc.yml; delete it (or {BLESS_HINT})"
            )
    if problems.report("Reference notebooks (tests/notebooks) are not up to date"):
        return 1
    print(f"tests/notebooks: {len(chapters)} reference notebook(s) up to date with book/")
    return 0


# ----------------------------------------------------------------------------- bless


def _stable_ids(nb) -> None:
    """Replace the random cell ids that jupytext draws by ids derived from the cells."""
    seen: Counter = Counter()
    for cell in nb.cells:
        digest = hashlib.sha1(f"{cell.cell_type}\0{cell.source}".encode()).hexdigest()[:12]
        seen[digest] += 1
        cell.id = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"


def _clean(nb) -> None:
    """Keep what nbval needs and nothing that changes from one run or machine to the next."""
    language_info = dict(nb.metadata.get("language_info", {}))
    language_info.pop("version", None)  # the patch version of Python
    metadata = {"kernelspec": nb.metadata["kernelspec"]} if "kernelspec" in nb.metadata else {}
    nb.metadata = nbformat.from_dict({**metadata, "language_info": language_info})
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
    _stable_ids(nb)


def execute(chapter: Chapter, timeout: int):
    from nbclient import NotebookClient

    nb = jupytext.read(chapter.source)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=nb.metadata.get("kernelspec", {}).get("name", KERNEL),
        resources={"metadata": {"path": str(chapter.source.parent)}},  # cwd: as in the book build
        allow_errors=False,  # cells tagged raises-exception may still raise
        record_timing=False,
        coalesce_streams=True,  # one stdout and one stderr output per cell, however it was flushed
    )
    client.execute()
    return nb


def bless(args) -> int:
    # References are CPU runs, whoever calls this script.
    os.environ["PEBOOK_DEVICE"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["MPLBACKEND"] = INLINE_BACKEND  # figures displayed as in the book, whatever the shell says
    kernel_problem = check_kernel()
    if kernel_problem:
        raise SystemExit(kernel_problem)
    chapters = toc_chapters()
    chosen = select(chapters, args.chapters)
    failed = []
    for chapter in chosen:
        start = time.perf_counter()
        print(f"bless: executing {chapter} ...", flush=True)
        try:
            nb = execute(chapter, args.timeout)
        except Exception as err:  # nbclient's CellExecutionError, a timeout, a dead kernel
            print(f"bless: {chapter} FAILED, its reference is left as it was:\n{err}", file=sys.stderr)
            failed.append(chapter)
            continue
        _clean(nb)
        nbformat.validate(nb)
        chapter.reference.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, chapter.reference)
        print(f"bless: wrote {chapter.reference.relative_to(ROOT)} ({time.perf_counter() - start:.1f} s)")
    if not args.chapters:
        keep = {chapter.reference for chapter in chapters}
        for orphan in reference_files():
            if orphan not in keep:
                orphan.unlink()
                print(f"bless: removed {orphan.relative_to(ROOT)} (no such chapter in _toc.yml)")
    if failed:
        print(f"bless: {len(failed)} chapter(s) failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- compare


def compare(args) -> int:
    """Run pytest with nbval's collector, fed by the build's outputs instead of a kernel."""
    import pytest

    build_dir = Path(args.build_dir).resolve()
    chapters = toc_chapters()
    problems = Problems()
    pairs = {}
    for chapter in chapters:
        built = build_dir / f"{chapter.docname}.ipynb"
        if not built.is_file():
            problems.append(f"{chapter}: the book build wrote no {built}; build the book first (make book)")
        elif not chapter.reference.is_file():
            problems.append(f"{chapter}: no reference {chapter.reference.relative_to(ROOT)}; {BLESS_HINT}")
        else:
            pairs[chapter.reference.resolve()] = built
    if problems.report("Cannot compare the book build with tests/notebooks"):
        return 1
    if not pairs:
        print("compare: no chapter has code cells; nothing to compare")
        return 0
    argv = ["-p", "no:cacheprovider", "-q", f"--rootdir={ROOT}", *map(str, sorted(pairs))]
    if args.sanitize_with:
        argv[:0] = ["--nbval-sanitize-with", str(Path(args.sanitize_with).resolve())]
    print(f"compare: {len(pairs)} executed chapter(s) in {build_dir} against tests/notebooks (nbval, no re-execution)")
    code = pytest.main(argv, plugins=[_BuildOutputs(pairs)])
    if code != 0:
        print(
            "\nThe chapters' outputs in this build differ from tests/notebooks (see above). If the change "
            f"is intended, {BLESS_HINT}.",
            file=sys.stderr,
        )
    return int(code)


class _BuildOutputs:
    """pytest plugin: collect each reference notebook as an nbval file whose 'test' outputs
    are those the book build stored, instead of those of a fresh kernel."""

    def __init__(self, pairs: dict[Path, Path]):
        self.pairs = pairs

    def pytest_collect_file(self, file_path, parent):
        built = self.pairs.get(Path(file_path).resolve())
        if built is not None:
            node = _nbval_classes()[0].from_parent(parent, path=file_path)
            node.built_path = built
            return node
        return None


_CLASSES: tuple | None = None


def _nbval_classes():
    """nbval's collector and item, subclassed to read outputs from a notebook (nbval 0.11)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    import pytest
    from nbval.plugin import IPyNbCell, IPyNbFile, coalesce_streams, find_comment_markers, find_metadata_tags

    class BuiltNotebook(IPyNbFile):
        built_path: Path

        def setup(self):
            self.setup_sanitize_files()  # no kernel: nothing is executed

        def teardown(self):
            pass

        def collect(self):
            self.nb = nbformat.read(self.path, as_version=4)
            built = _code_cells(nbformat.read(self.built_path, as_version=4))
            cells = _code_cells(self.nb)
            if [c.source for c in cells] != [c.source for c in built]:
                raise self.CollectError(
                    f"the code cells of {self.built_path} differ from those of {self.path}: "
                    f"the reference is stale; {BLESS_HINT}"
                )
            for cell_num, (cell, built_cell) in enumerate(zip(cells, built)):
                # The options nbval would use: metadata tags, overridden by comment markers.
                options = defaultdict(bool, find_metadata_tags(cell.metadata))
                options.update(dict(find_comment_markers(cell.source)))
                options.setdefault("check", self.compare_outputs)
                yield BuiltCell.from_parent(
                    self, name=f"Cell {cell_num}", cell_num=cell_num, cell=cell, options=options, built=built_cell
                )

    class BuiltCell(IPyNbCell):
        def __init__(self, name, parent, cell_num, cell, options, built):
            super().__init__(name, parent, cell_num, cell, options)
            self.built = built

        def runtest(self):  # IPyNbCell.runtest, with the kernel replaced by the built cell
            if self.options["skip"]:
                pytest.skip()
            if self.built.get("execution_count") is None:
                self.raise_cell_error("The book build did not execute this cell")
            outs = coalesce_streams(copy.deepcopy(self.built.outputs))
            self.test_outputs = outs
            for out in outs:
                if out.output_type == "error" and not self.options["check_exception"]:
                    self.raise_cell_error("Cell execution caused an exception", "\n" + "\n".join(out.traceback))
            if self.options["check"] and self.cell.execution_count is not None:
                if not self.compare_outputs(outs, coalesce_streams(copy.deepcopy(self.cell.outputs))):
                    self.raise_cell_error("Cell outputs differ", "\n".join(self.comparison_traceback))

    _CLASSES = (BuiltNotebook, BuiltCell)
    return _CLASSES


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="fail unless tests/notebooks matches book/ and _toc.yml")
    p_bless = commands.add_parser("bless", help="execute chapters on the CPU into tests/notebooks")
    p_bless.add_argument("chapters", nargs="*", help="chapter names (default: all), e.g. quickstart")
    p_bless.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    p_compare = commands.add_parser("compare", help="compare a book build's executed notebooks with tests/notebooks")
    p_compare.add_argument("build_dir", help="where the build wrote executed notebooks, e.g. _build/jupyter_execute")
    p_compare.add_argument("--sanitize-with", help="nbval sanitizer file, as for --nbval-sanitize-with")
    args = parser.parse_args(argv)
    return {"check": check, "bless": bless, "compare": compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

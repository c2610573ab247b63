"""tests/sitecheck.py, the checks that close `make book`.

The build-failure summary is tested on logs in the format of nbclient and Sphinx. The browser
check runs on a small site written here, with one page that passes and one that has every
problem the check knows; it needs Debian's Chromium and is skipped where there is none.
"""

import base64
import importlib.util
import shutil
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sitecheck", TESTS / "sitecheck.py")
sitecheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sitecheck)

CHAPTER = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A chapter

```{code-cell} ipython3
x = 1
```

Some prose: y = x + 1 is computed below.

```{code-cell} ipython3
y = x + 1
raise ValueError("boom")
```
"""

CELL_ERROR_LOG = """\
reading sources... [ 50%] book/chapter
Traceback (most recent call last):
  File "myst_nb/core/execute/direct.py", line 51, in start_client
    raise ExecutionError(str(self.path)) from result.err
myst_nb.core.execute.base.ExecutionError: {root}/book/chapter.md
  File "nbclient/client.py", line 918, in _check_raise_for_error
    raise CellExecutionError.from_cell_and_msg(cell, exec_reply_content)
nbclient.exceptions.CellExecutionError: An error occurred while executing the following cell:
------------------
y = x + 1
raise ValueError("boom")
------------------


---------------------------------------------------------------------------
ValueError                                Traceback (most recent call last)
Cell In[2], line 2
      1 y = x + 1
----> 2 raise ValueError("boom")

ValueError: boom

The above exception was the direct cause of the following exception:

RuntimeError: There was an error in building your book.
"""

TIMEOUT_LOG = """\
myst_nb.core.execute.base.ExecutionError: {root}/book/chapter.md
nbclient.exceptions.CellTimeoutError: A cell timed out while it was being executed, after 120 seconds.
The message was: Cell execution timed out.
Here is a preview of the cell contents:
-------------------
['y = x + 1', 'raise ValueError("boom")']
-------------------
"""

WARNING_LOG = """\
reading sources... [100%] book/chapter
\x1b[91m{root}/book/chapter.md:21: WARNING: stderr was found in the cell outputs of cell 3 [mystnb.stderr]\x1b[39;49;00m
build finished with problems, 1 warning (with warnings treated as errors).
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "chapter.md").write_text(CHAPTER)
    monkeypatch.setattr(sitecheck, "ROOT", tmp_path)
    return tmp_path


def _failure(project, log_text, capsys):
    log = project / "jupyter-book.log"
    log.write_text(log_text.format(root=project))
    assert sitecheck.main(["build-failure", str(log), "--site", str(project / "html")]) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_a_failing_cell_is_named_with_its_chapter_line_and_exception(project, capsys):
    assert _failure(project, CELL_ERROR_LOG, capsys) == [
        "make book: book/chapter.md cell 2 (line 21): ValueError: boom"
    ]


def test_a_cell_that_times_out_is_named(project, capsys):
    (line,) = _failure(project, TIMEOUT_LOG, capsys)
    assert line.startswith("make book: book/chapter.md cell 2 (line 21): CellTimeoutError: ")
    assert "120 s" in line


def test_a_fatal_warning_is_listed_with_its_place(project, capsys):
    lines = _failure(project, WARNING_LOG, capsys)
    assert lines[-1] == (
        "make book: book/chapter.md:21: WARNING: stderr was found in the cell outputs of cell 3 [mystnb.stderr]"
    )


def test_a_sphinx_error_is_quoted(project, capsys):
    log = "Extension error:\nCould not import extension nope (exception: No module named 'nope')\nTraceback ...\n"
    assert _failure(project, log, capsys) == [
        "make book: the book build failed: Extension error: Could not import extension nope "
        "(exception: No module named 'nope')"
    ]


def test_a_myst_nb_report_is_read_when_the_log_says_nothing(project, capsys):
    report = project / "html" / "reports" / "book" / "chapter.err.log"
    report.parent.mkdir(parents=True)
    report.write_text(CELL_ERROR_LOG.format(root=project).split("CellExecutionError: ", 1)[1])
    assert _failure(project, "build finished with problems\n", capsys) == [
        "make book: book/chapter.md cell 2 (line 21): ValueError: boom"
    ]


# ----------------------------------------------------------------------------- the browser check

PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)

# A stand-in for MathJax 3: typesets every span.math a moment after the page has loaded.
FAKE_MATHJAX = """
<script>
window.MathJax = {startup: {promise: new Promise((resolve) => window.addEventListener('load', () =>
  setTimeout(() => {
    for (const span of document.querySelectorAll('span.math')) {
      const c = document.createElement('mjx-container');
      c.textContent = 'x';
      span.replaceChildren(c);
    }
    resolve();
  }, 300)))}};
</script>
"""


def _page(body: str, head: str = "") -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>t</title>{head}</head>"
        f"<body><main><article class='bd-article' style='width: 600px'>{body}</article></main></body></html>"
    )


GOOD = _page(
    """
    <section id="start"><h1>Good</h1>
    <p>Typeset later: <span class="math">\\(x^2\\)</span>. In code: <code>\\(not maths\\)</code>.</p>
    <pre>raise ValueError("\\begin{shown}")</pre>
    <p><img src="dot.png" alt="dot"> <a href="bad.html#here">there</a> <a href="#start">top</a>
       <a href="https://example.org/paper">a paper</a> <a href="sub/">folder</a></p>
    <div class="cell tag_raises-exception"><div class="cell_output">
      <div class="output traceback">Traceback (most recent call last)\nValueError: meant</div></div></div>
    </section>
    """,
    head=FAKE_MATHJAX,
)

BAD = _page(
    """
    <section id="here"><h1>Bad</h1>
    <p>Raw maths: \\(a + b\\)</p><p>and $$c$$.</p>
    <p><img src="missing.png" alt="gone"> <a href="nowhere.html">lost</a> <a href="good.html#absent">no anchor</a></p>
    <div style="width: 900px">too wide</div>
    <div class="cell"><div class="cell_output">
      <div class="output stderr">warning: something\n</div></div></div>
    <div class="cell"><div class="cell_output"><div class="output stream">Traceback (most recent call last):
      File "x", line 1\nKeyError: 'k'</div></div></div>
    </section>
    <script>
      console.error("something broke");
      fetch("https://cdn.example.com/lib.js").catch(() => null);
      setTimeout(() => { throw new Error("uncaught"); }, 0);
    </script>
    """
)


def _chromium() -> str | None:
    return shutil.which(sitecheck.CHROMIUM)


needs_chromium = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or _chromium() is None,
    reason="needs playwright and Debian's chromium (/usr/bin/chromium)",
)


@needs_chromium
def test_the_browser_check_passes_a_good_page_and_names_every_problem_of_a_bad_one(tmp_path, capsys):
    site = tmp_path / "html"
    (site / "sub").mkdir(parents=True)
    (site / "good.html").write_text(GOOD)
    (site / "bad.html").write_text(BAD)
    (site / "sub" / "index.html").write_text(_page("<p>index</p>"))
    (site / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=good.html" />')
    (site / "dot.png").write_bytes(PNG_1x1)
    shots = tmp_path / "shots"

    code = sitecheck.main(["browse", str(site), "--screenshots", str(shots), "--chromium", _chromium()])
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if not line.startswith("sitecheck:")]

    assert code == 1
    assert not [line for line in problems if not line.startswith("bad.html: ")], out
    expected = [
        "raw TeX (maths not typeset) in 2 place(s)",
        "console error: something broke",
        "uncaught page error: uncaught",
        "request to a non-local address (blocked): https://cdn.example.com/lib.js",
        "resource not found (HTTP 404): missing.png",
        "broken image",
        "broken link to nowhere.html ('lost')",
        "broken link to good.html#absent: no such anchor ('no anchor')",
        "sticks out of the main column by 300 px",
        "stderr output in the output of code cell 1",
        "a traceback in the output of code cell 2",
    ]
    for problem in expected:
        assert any(problem in line for line in problems), f"{problem!r} not reported:\n{out}"
    assert "sitecheck: 3 passed, 1 failed" in out.splitlines()
    assert {p.relative_to(shots).as_posix() for p in shots.rglob("*.png")} == {"good.png", "bad.png", "sub/index.png"}

#!/usr/bin/env python
"""Checks of the built book (driven by the Makefile's ``make book``).

    python tests/sitecheck.py browse [SITE] [--screenshots DIR]
        Serve SITE (default _build/html) on 127.0.0.1 and load every page in headless Chromium
        (Debian's ``chromium`` package, driven by Playwright; no browser is downloaded) at
        1280 px. Fail, printing one line ``PAGE: problem`` per problem and a summary, on
          - raw TeX left on a page (MathJax did not typeset it) or a MathJax error;
          - a console error or an uncaught page error;
          - a request to any address other than 127.0.0.1 (such requests are blocked);
          - a page resource that fails to load, a broken image, an internal link to a file that
            does not exist or to an anchor that its page does not have (external links are
            listed in the summary, never fetched);
          - horizontal scrolling in the main column at 1280 px outside code cells and outputs
            (an element wider than the column, or a box other than code that scrolls);
          - a traceback or an error/stderr output in a code cell's output (except in cells
            tagged ``raises-exception``).
        Saves a full-page screenshot of each page, cut at 16384 px, as DIR/<page>.png (default
        _build/screenshots). `make sitecheck` runs this on the last build; --help for options.

    python tests/sitecheck.py build-failure LOG [--site SITE]
        After a failed ``jupyter-book build``: print one line per cause, naming the chapter,
        the cell and the exception (``make book: book/rope.md cell 12 (line 340):
        ZeroDivisionError: division by zero``), from the build's log LOG and the reports that
        myst-nb writes under SITE/reports/. Always exits 0 (the build has already failed).

Run it with the project's virtual environment: ``.venv/bin/python tests/sitecheck.py ...``.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import os
import re
import shutil
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
# Debian's chromium package; SITECHECK_CHROMIUM=/path/to/chromium (or --chromium) for another.
CHROMIUM = os.environ.get("SITECHECK_CHROMIUM", "/usr/bin/chromium")
WIDTH, HEIGHT = 1280, 900
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-dev-shm-usage",  # containers often have a small /dev/shm
    # Belt and braces: no host name resolves, whatever the page or the browser itself asks for.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]
SNIPPET = 90  # characters of page text quoted in a problem
# Boxes that may scroll horizontally (and whatever is inside them): code cells, their outputs
# and MathJax's hidden copy of each formula for screen readers.
MAY_SCROLL = [
    "pre",
    ".highlight",
    ".cell_input",
    ".cell_output",
    ".output",
    "mjx-assistive-mml",
    ".MJX_Assistive_MathML",
]


# ----------------------------------------------------------------------------- the page side

# Resolves once MathJax (v2 or v3/v4) has finished typesetting the page, or says why not.
WAIT_FOR_MATHJAX = """
async (timeoutMs) => {
  const hasMath = !!document.querySelector('.math, span.math, div.math, script[type^="math/tex"]');
  const timeout = new Promise((resolve) => setTimeout(() => resolve('timeout'), timeoutMs));
  const MJ = window.MathJax;
  if (!MJ) return hasMath ? 'not-loaded' : 'no-math';
  if (MJ.startup && MJ.startup.promise) {                     // MathJax 3 and 4
    const settled = (async () => {
      let promise;
      do { promise = MJ.startup.promise; await promise; } while (promise !== MJ.startup.promise);
      return 'v3';
    })();
    return await Promise.race([settled, timeout]);
  }
  if (MJ.Hub && MJ.Hub.Queue) {                               // MathJax 2
    const settled = new Promise((resolve) => MJ.Hub.Queue(() => resolve('v2')));
    return await Promise.race([settled, timeout]);
  }
  return hasMath ? 'not-loaded' : 'no-math';                  // only the configuration object
}
"""

# Everything checked inside the page, in one pass once MathJax is done.
INSPECT = r"""
async ([SNIP, SCROLLS_ITSELF]) => {
  const clip = (s) => {
    s = (s || '').replace(/\s+/g, ' ').trim();
    return s.length > SNIP ? s.slice(0, SNIP - 1) + '…' : s;
  };
  const section = (el) => {
    const sec = el.closest('section');
    if (!sec) return '';
    const h = sec.querySelector('h1, h2, h3, h4, h5, h6');
    return h ? clip(h.textContent.replace(/#\s*$/, '')) : (sec.id || '');
  };
  const where = (el) => { const s = section(el); return s ? ` (section "${s}")` : ''; };
  const texOf = (el) => {  // the TeX source of a typeset formula (MathJax 3 or 2), if it can be had
    try {
      const MJ = window.MathJax;
      const items = MJ.startup.document.getMathItemsWithin(el);
      if (items.length) return items[0].math;
    } catch (e) { /* not MathJax 3 */ }
    try {
      return window.MathJax.Hub.getJaxFor(el).originalText;
    } catch (e) { return null; }
  };
  const describe = (el) => {
    if (el.matches('mjx-container, .MathJax, .MathJax_Display')) {
      const math = el.closest('.math[id]');
      const tex = texOf(el);
      return 'the formula' + (math ? ' #' + math.id : '') + (tex ? ` "${clip(tex).slice(0, 60)}"` : '');
    }
    let d = el.tagName.toLowerCase();
    if (el.id) d += '#' + el.id;
    const cls = [...el.classList].filter((c) => !/^(docutils|notranslate|container|CtxtMenu_.*)$/.test(c)).slice(0, 3);
    if (cls.length) d += '.' + cls.join('.');
    return d;
  };
  const result = {};
  await document.fonts.ready;

  // 1. Raw TeX in text outside code, and MathJax errors.
  const CODE = 'pre, code, kbd, samp, tt, script, style, noscript, template, textarea, .highlight, ' +
               'mjx-container, mjx-assistive-mml, .MathJax, .MathJax_Display, .MathJax_Preview, .MJX_Assistive_MathML';
  const TEX = /\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\\end\{|\\[A-Za-z]{2,}\b|\$[^$\n]*[\\_^{}][^$\n]*\$/;
  const raw = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(CODE)) continue;
    const text = node.textContent;
    const m = TEX.exec(text);
    if (m) {
      const start = Math.max(0, m.index - 20);
      raw.push(clip(text.slice(start, start + SNIP)) + where(parent));
    }
  }
  result.rawTex = raw;
  result.mathErrors = [...document.querySelectorAll('mjx-merror, .MathJax_Error, merror')].map(
    (el) => clip(el.getAttribute('data-mjx-error') || el.textContent) + where(el));

  // 2. Broken images (lazy ones are made eager first).
  const images = [...document.images];
  for (const img of images) if (img.loading === 'lazy') img.loading = 'eager';
  await Promise.all(images.map((img) => img.decode().catch(() => null)));
  result.brokenImages = images
    .filter((img) => img.getAttribute('src') && (!img.complete || img.naturalWidth === 0) &&
                     !/\.svg(\?|#|$)/i.test(img.currentSrc || img.src))
    .map((img) => ({src: img.currentSrc || img.src, alt: clip(img.alt), where: where(img)}));

  // 3. Links and the anchors of this page.
  result.links = [...document.querySelectorAll('a[href], area[href]')].map((a) => ({
    href: a.href,
    text: clip(a.textContent) || clip(a.getAttribute('aria-label')) || clip(a.title),
    where: where(a),
  }));
  result.ids = [...document.querySelectorAll('[id]')].map((el) => el.id)
    .concat([...document.querySelectorAll('a[name]')].map((a) => a.name));

  // 4. Horizontal scrolling at this width, outside code cells and outputs.
  const article = document.querySelector('article.bd-article') || document.querySelector('main, [role=main]') ||
                  document.body;
  const box = article.getBoundingClientRect();
  const right = box.left + article.clientWidth;
  const overflow = [];
  const doc = document.scrollingElement || document.documentElement;
  if (doc.scrollWidth > window.innerWidth + 1)
    overflow.push(`the page scrolls horizontally at ${window.innerWidth} px (${doc.scrollWidth} px wide)`);
  const seen = new Set();
  for (const el of article.querySelectorAll('*')) {
    if (el.closest(SCROLLS_ITSELF)) continue;
    const parentMath = el.parentElement && el.parentElement.closest('mjx-container');
    if (parentMath) continue;                      // a formula is measured as one box
    const style = getComputedStyle(el);
    if (style.display === 'none' || style.visibility === 'hidden' || style.position === 'fixed') continue;
    const r = el.getBoundingClientRect();
    if (r.width <= 1 || r.height <= 1) continue;
    const scrolls = /auto|scroll/.test(style.overflowX);
    if (scrolls && el.scrollWidth > el.clientWidth + 1) {
      overflow.push(`${describe(el)} scrolls horizontally: its content is ${el.scrollWidth} px wide ` +
                    `in a ${el.clientWidth} px box` + where(el));
      seen.add(el);
      continue;
    }
    if (r.right > right + 1) {
      // Report the outermost culprit only: skip descendants of an element already reported.
      let reported = false;
      for (let a = el.parentElement; a && a !== article && !reported; a = a.parentElement) reported = seen.has(a);
      seen.add(el);
      if (!reported)
        overflow.push(`${describe(el)} sticks out of the main column by ${Math.round(r.right - right)} px` +
                      (clip(el.textContent) ? ` ("${clip(el.textContent).slice(0, 40)}")` : '') + where(el));
    }
  }
  result.overflow = overflow;

  // 5. Tracebacks and error or stderr outputs in code cells.
  const cells = [...document.querySelectorAll('div.cell')];
  const errors = [];
  cells.forEach((cell, i) => {
    if (cell.classList.contains('tag_raises-exception')) return;
    for (const out of cell.querySelectorAll('.cell_output .output, .cell_output .output_area')) {
      const text = out.textContent || '';
      const kind = out.classList.contains('traceback') ? 'a traceback'
                 : out.classList.contains('error') ? 'an error output'
                 : out.classList.contains('stderr') ? 'stderr output'
                 : /Traceback \(most recent call last\)/.test(text) ? 'a traceback' : null;
      if (!kind) continue;
      const lines = text.split('\n').map((l) => l.trim()).filter(Boolean);
      errors.push(`${kind} in the output of code cell ${i + 1}${where(cell)}: ${clip(lines[lines.length - 1] || '')}`);
    }
  });
  result.cellErrors = errors;
  return result;
}
"""


# ----------------------------------------------------------------------------- the site side


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_Handler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def site_pages(site: Path) -> list[str]:
    """Every HTML page of the build, as paths relative to SITE (no _static/, _sources/, ...)."""
    pages = []
    for path in sorted(site.rglob("*.html")):
        relative = path.relative_to(site)
        if any(part.startswith(("_", ".")) for part in relative.parts[:-1]) or relative.parts[0] == "reports":
            continue
        pages.append(relative.as_posix())
    return pages


_REFRESH = re.compile(r"""<meta\s+http-equiv=["']refresh["']\s+content=["'][^"']*url=([^"']+)["']""", re.I)


def redirect_target(site: Path, page: str) -> str | None:
    """The target of a page that is only a <meta http-equiv="refresh"> redirect, else None."""
    text = (site / page).read_text("utf8", errors="replace")
    match = _REFRESH.search(text)
    if match and len(text) < 2000:
        return match.group(1).strip()
    return None


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value and (name == "id" or (tag == "a" and name == "name")):
                self.ids.add(value)


@functools.cache
def static_ids(path: Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(path.read_text("utf8", errors="replace"))
    return frozenset(parser.ids)


class Report:
    def __init__(self):
        self.problems: dict[str, list[str]] = defaultdict(list)

    def add(self, page: str, problem: str) -> None:
        if problem not in self.problems[page]:
            self.problems[page].append(problem)
            print(f"{page}: {problem}", flush=True)

    @property
    def count(self) -> int:
        return sum(map(len, self.problems.values()))


def _summarise(items: list[str], what: str, limit: int = 3) -> str:
    shown = "; ".join(f"'{item}'" for item in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{what} in {len(items)} place(s): {shown}{more}"


def browse(args) -> int:
    site = Path(args.site).resolve()
    if not (site / "index.html").is_file() and not site_pages(site):
        print(f"sitecheck: no built site in {site}; run `make book` first", file=sys.stderr)
        return 2
    chromium = shutil.which(args.chromium) or args.chromium
    if not Path(chromium).is_file():
        print(
            f"sitecheck: no Chromium at {args.chromium}; install Debian's package "
            "(sudo apt-get install chromium fonts-noto-cjk) or pass --chromium PATH",
            file=sys.stderr,
        )
        return 2
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("sitecheck: playwright is not installed (it is pinned in requirements.txt: make venv)", file=sys.stderr)
        return 2

    pages = site_pages(site)
    if args.pages:
        wanted = {p if p.endswith(".html") else f"{p}.html" for p in args.pages}
        pages = [p for p in pages if p in wanted or p.rsplit("/", 1)[-1] in wanted]
    shots = Path(args.screenshots).resolve() if args.screenshots else None
    if shots is not None and shots.is_dir():
        for old in shots.rglob("*.png"):
            old.unlink()

    start = time.perf_counter()
    report = Report()
    server, base = serve(site)
    live_ids: dict[str, set[str]] = {}
    links: list[tuple[str, dict]] = []
    external: set[str] = set()
    checked = 0
    try:
        with sync_playwright() as pw:
            # launch() gives the browser a fresh temporary user data dir, deleted at close; each
            # page then gets its own context (empty storage), as on a reader's first visit.
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            for name in pages:
                checked += 1
                target = redirect_target(site, name)
                if target is not None:  # index.html: <meta refresh> to the first chapter
                    href = base + os.path.normpath(os.path.join(os.path.dirname(name), target))
                    links.append((name, {"href": href, "text": "(redirect)", "where": ""}))
                    continue
                context = browser.new_context(
                    viewport={"width": WIDTH, "height": HEIGHT},
                    device_scale_factor=1,
                    color_scheme="light",
                    locale="en-US",
                    timezone_id="UTC",
                    service_workers="block",
                )
                context.set_default_timeout(args.timeout * 1000)
                began = time.perf_counter()
                try:
                    _check_page(context, base, name, args, report, live_ids, links, shots, PlaywrightError)
                finally:
                    context.close()
                if args.verbose:
                    print(f"sitecheck: {name} checked in {time.perf_counter() - began:.1f} s", flush=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()

    # Links: resolved against the files of the build and the anchors of the pages as loaded.
    for page, link in links:
        href = link["href"]
        parts = urlsplit(href)
        if parts.scheme in ("javascript", "data", "blob", "about"):
            continue
        if parts.scheme in ("http", "https") and parts.netloc != urlsplit(base).netloc:
            external.add(href)
            continue
        if parts.scheme not in ("http", "https"):
            if parts.scheme in ("mailto", "tel"):
                external.add(href)
            else:
                report.add(page, f"link to a non-web address {href!r} ('{link['text']}'){link['where']}")
            continue
        path = unquote(parts.path).lstrip("/")
        file = site / path
        if path == "" or file.is_dir():
            file = file / "index.html"
            path = (Path(path) / "index.html").as_posix() if path else "index.html"
        if not file.is_file():
            report.add(page, f"broken link to {path} ('{link['text']}'){link['where']}")
            continue
        fragment = unquote(parts.fragment)
        if fragment and file.suffix == ".html":
            ids = live_ids.get(path)
            if ids is None:
                ids = static_ids(file)
            if fragment not in ids and parts.fragment not in ids:
                report.add(page, f"broken link to {path}#{fragment}: no such anchor ('{link['text']}'){link['where']}")

    elapsed = time.perf_counter() - start
    where = f"; screenshots in {shots.relative_to(ROOT) if shots.is_relative_to(ROOT) else shots}/" if shots else ""
    external_note = f", {len(external)} external link(s) not fetched" if external else ""
    failed = len(report.problems)
    if report.count:
        print(
            f"sitecheck: {report.count} problem(s) on {failed} of {checked} page(s) "
            f"({elapsed:.1f} s{external_note}){where}"
        )
    else:
        print(f"sitecheck: {checked} page(s) checked in {elapsed:.1f} s, no problems{external_note}{where}")
    print(f"sitecheck: {checked - failed} passed, {failed} failed")
    return 1 if report.count else 0


def _check_page(context, base, name, args, report, live_ids, links, shots, PlaywrightError) -> None:
    blocked: set[str] = set()
    failed: set[str] = set()

    def route(route):
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in LOCAL_HOSTS:
            blocked.add(url)
            report.add(name, f"request to a non-local address (blocked): {url}")
            route.abort("blockedbyclient")
        else:
            route.continue_()

    context.route("**/*", route)
    page = context.new_page()

    def on_console(message):
        if message.type != "error":
            return
        text = message.text
        url = (message.location or {}).get("url", "")
        if text.startswith("Failed to load resource") and (url in failed or url in blocked):
            return  # already reported as a request problem
        at = f" (at {url.replace(base, '')}:{message.location.get('lineNumber', 0) + 1})" if url else ""
        report.add(name, f"console error: {text[:300]}{at}")

    def on_response(response):
        url = response.url
        if response.status >= 400 and urlsplit(url).hostname in LOCAL_HOSTS:
            if urlsplit(url).path == "/favicon.ico":
                return  # the browser's own guess, not asked for by the page
            failed.add(url)
            report.add(name, f"resource not found (HTTP {response.status}): {url.replace(base, '')}")

    def on_request_failed(request):
        url = request.url
        if url in blocked or url in failed or urlsplit(url).hostname not in LOCAL_HOSTS:
            return
        failed.add(url)
        report.add(name, f"request failed ({request.failure}): {url.replace(base, '')}")

    def on_websocket(websocket):
        if urlsplit(websocket.url).hostname not in LOCAL_HOSTS:
            report.add(name, f"websocket to a non-local address: {websocket.url}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: report.add(name, f"uncaught page error: {str(error)[:300]}"))
    page.on("response", on_response)
    page.on("requestfailed", on_request_failed)
    page.on("websocket", on_websocket)
    try:
        page.goto(base + name, wait_until="load")
        mathjax = page.evaluate(WAIT_FOR_MATHJAX, args.timeout * 1000)
        if mathjax == "not-loaded":
            report.add(name, "MathJax did not load (the page has maths)")
        elif mathjax == "timeout":
            report.add(name, f"MathJax did not finish typesetting within {args.timeout} s")
        found = page.evaluate(INSPECT, [SNIPPET, ", ".join([*MAY_SCROLL, *args.allow_scroll])])
        if shots is not None:
            out = shots / Path(name).with_suffix(".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            height = page.evaluate("() => document.documentElement.scrollHeight")
            clip = None
            if not args.first_screen and args.max_height and height > args.max_height:
                clip = {"x": 0, "y": 0, "width": WIDTH, "height": args.max_height}  # top of a very long page
            page.screenshot(path=str(out), full_page=not args.first_screen, clip=clip, animations="disabled")
    except PlaywrightError as error:
        report.add(name, f"the browser could not check the page: {str(error).splitlines()[0]}")
        page.close()
        return
    page.close()
    if found["rawTex"]:
        report.add(name, _summarise(found["rawTex"], "raw TeX (maths not typeset)"))
    if found["mathErrors"]:
        report.add(name, _summarise(found["mathErrors"], "MathJax error"))
    for image in found["brokenImages"]:
        report.add(name, f"broken image {image['src'].replace(base, '')} (alt '{image['alt']}'){image['where']}")
    for problem in found["overflow"]:
        report.add(name, f"at {WIDTH} px, {problem}")
    for problem in found["cellErrors"]:
        report.add(name, problem)
    live_ids[name] = set(found["ids"])
    links.extend((name, link) for link in found["links"])


# ----------------------------------------------------------------------------- build failures

_EXEC_ERROR = re.compile(r"ExecutionError: (\S+\.(?:md|ipynb))")
_READING = re.compile(r"reading sources\.\.\. \[\s*\d+%\]\s+(\S+)")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning|Timeout\w*))(?::\s*(.*))?$")
_WARNING = re.compile(r"^(\S.*?):(\d+)?:? ?(?:WARNING|ERROR): (.*)$")


def _cell_block(text: str) -> str | None:
    """The source of the failing cell in nbclient's CellExecutionError / CellTimeoutError text."""
    match = re.search(r"An error occurred while executing the following cell:\n-{10,}\n(.*?)\n-{10,}\n", text, re.S)
    if match:
        return match.group(1)
    match = re.search(r"Here is a preview of the cell contents:\n-{10,}\n(.*?)\n-{10,}", text, re.S)
    if match:
        preview = match.group(1).strip()
        try:  # nbclient shows a list of the first and last lines
            import ast

            lines = ast.literal_eval(preview)
            return "\n".join(lines) if isinstance(lines, list) else preview
        except (ValueError, SyntaxError):
            return preview
    return None


def _locate_cell(chapter: Path, source: str | None) -> str:
    """'cell N (line L)' for the code cell of CHAPTER whose source matches SOURCE."""
    if not source or not chapter.is_file():
        return ""
    try:
        import jupytext

        cells = [c for c in jupytext.read(chapter).cells if c.cell_type == "code"]
    except Exception:  # noqa: BLE001 (a chapter that no longer parses: no cell number)
        cells = []
    lines = [line for line in source.splitlines() if line.strip() and not line.startswith("...")]
    number = None
    for index, cell in enumerate(cells, start=1):
        if source.strip() == cell.source.strip() or (lines and all(line in cell.source for line in lines)):
            number = index
            break
    text = chapter.read_text("utf8")
    line = None
    if lines:
        # The cell's first line, searched from its own {code-cell} fence when the number is known.
        fences = [m.start() for m in re.finditer(r"^[`~]{3,}\s*\{code-cell\}", text, re.M)]
        start = fences[number - 1] if number is not None and number <= len(fences) else 0
        position = text.find(lines[0], start)
        if position >= 0:
            line = text.count("\n", 0, position) + 1
    if number is None and line is None:
        return ""
    if number is None:
        return f" line {line}"
    return f" cell {number}" + (f" (line {line})" if line is not None else "")


def _exception(text: str) -> str:
    """The last 'Name: message' line of a traceback, ANSI colours removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    if "CellTimeoutError" in text or "A cell timed out while it was being executed" in text:
        match = re.search(r"timed out while it was being executed, after (\d+) seconds", text)
        limit = f"the {match.group(1)} s limit" if match else "its time limit"
        return f"CellTimeoutError: the cell ran longer than {limit} (execute.timeout in _config.yml)"
    if "DeadKernelError" in text:
        return "DeadKernelError: the kernel died (out of memory?)"
    # nbclient's message: the cell's source between dashed lines, its outputs, then the cell's
    # traceback, which ends with the exception; myst-nb's own traceback follows it.
    block = text.split("An error occurred while executing the following cell:", 1)[-1]
    block = re.split(r"^-{10,}$", block, maxsplit=2, flags=re.M)[-1]
    block = block.split("The above exception was the direct cause of the following exception:", 1)[0]
    candidates = []
    for line in block.splitlines():
        match = _EXCEPTION_LINE.match(line.strip())
        if match and not match.group(1).endswith(("CellExecutionError", "ExecutionError", "ExtensionError")):
            candidates.append(line.strip())
    return candidates[-1] if candidates else "the cell raised an exception"


_SPHINX_ERRORS = (
    "Extension error|Sphinx error|Configuration error|Theme error|Exception occurred|Sphinx parallel build error"
)
_SPHINX_ERROR = re.compile(rf"^({_SPHINX_ERRORS}):?\s*(.*)$")


def _build_error(log: str) -> str | None:
    """Sphinx's own error message, else the first exception with a message, in LOG."""
    lines = [line.strip() for line in log.splitlines()]
    for index, line in enumerate(lines):
        match = _SPHINX_ERROR.match(line)
        if match:
            message = match.group(2) or next((rest for rest in lines[index + 1 :] if rest), "")
            return f"{match.group(1)}: {message}"
    for line in lines:
        match = _EXCEPTION_LINE.match(line)
        if match and match.group(2):
            return line
    return None


def build_failure(args) -> int:
    log_path = Path(args.log)
    log = log_path.read_text("utf8", errors="replace") if log_path.is_file() else ""
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    site = Path(args.site)
    lines = []
    texts: list[tuple[str, str]] = []  # (chapter path, error text)
    for report in sorted((site / "reports").rglob("*.err.log")) if (site / "reports").is_dir() else []:
        docname = report.relative_to(site / "reports").as_posix().removesuffix(".err.log")
        texts.append((docname, report.read_text("utf8", errors="replace")))
    match = _EXEC_ERROR.search(log)
    if match:
        path = Path(match.group(1))
        docname = (path.relative_to(ROOT) if path.is_absolute() and path.is_relative_to(ROOT) else path).with_suffix("")
        texts.append((docname.as_posix(), log))
    elif not texts and ("Kernel died" in log or "DeadKernelError" in log or "CellTimeoutError" in log):
        reading = _READING.findall(log)
        texts.append((reading[-1] if reading else "?", log))
    seen = set()
    for docname, text in texts:
        chapter = next((ROOT / f"{docname}{s}" for s in (".md", ".ipynb") if (ROOT / f"{docname}{s}").is_file()), None)
        shown = chapter.relative_to(ROOT).as_posix() if chapter else docname
        where = _locate_cell(chapter, _cell_block(text)) if chapter else ""
        line = f"make book: {shown}{where}: {_exception(text)}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    if not lines:
        ours = [line for line in log.splitlines() if not line.startswith("make book:")]
        warnings = list(dict.fromkeys(m.group(0) for m in map(_WARNING.match, ours) if m))
        if warnings:
            lines.append(f"make book: {len(warnings)} warning(s), errors under -W:")
        for warning in warnings:
            lines.append(f"make book: {warning.replace(str(ROOT) + '/', '')}")
    if not lines:
        lines.append(f"make book: the book build failed: {_build_error(log) or f'see {log_path}'}")
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p_browse = commands.add_parser("browse", help="load every built page in headless Chromium and check it")
    p_browse.add_argument("site", nargs="?", default=str(SITE), help="the built site (default _build/html)")
    p_browse.add_argument("--screenshots", default=str(SCREENSHOTS), help="folder for screenshots ('' for none)")
    p_browse.add_argument("--first-screen", action="store_true", help="screenshot the first screen, not the full page")
    p_browse.add_argument(
        "--max-height",
        type=int,
        default=16384,
        help="cut full-page screenshots at this many px (0: no limit; default 16384)",
    )
    p_browse.add_argument("--chromium", default=CHROMIUM, help=f"the Chromium executable (default {CHROMIUM})")
    p_browse.add_argument("--timeout", type=float, default=60, help="seconds per page load and typesetting")
    p_browse.add_argument("--pages", nargs="*", help="only these pages, e.g. book/rope.html")
    p_browse.add_argument(
        "--allow-scroll",
        action="append",
        default=[],
        metavar="SELECTOR",
        help="a CSS selector of boxes that may scroll horizontally, besides code and outputs (repeatable)",
    )
    p_browse.add_argument("-v", "--verbose", action="store_true", help="print the time each page took")
    p_failure = commands.add_parser("build-failure", help="one line per cause of a failed book build")
    p_failure.add_argument("log", help="the output of jupyter-book build")
    p_failure.add_argument("--site", default=str(SITE), help="the build's html folder (for reports/)")
    args = parser.parse_args(argv)
    return {"browse": browse, "build-failure": build_failure}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

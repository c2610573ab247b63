/* Search result snippets that quote the page's text (Sphinx 7.4 searchtools.js).
 *
 * For each result, Sphinx fetches the page and quotes the text of its [role="main"]
 * element around the first search term. With sphinx-book-theme two things go wrong:
 *   - [role="main"] begins with the article's header buttons, whose text is the download
 *     menu (".ipynb", ".md", ".pdf"), so the quote starts there;
 *   - Sphinx looks for the *stemmed* term ("rotari" for "rotary"), which the text does not
 *     contain, and then quotes the first 240 characters: "....ipynb".
 * This replaces the two functions: the text is that of the article (article.bd-article,
 * or the anchored section inside it) without its title, buttons, scripts or styles, with
 * whitespace collapsed and without MathJax's delimiters; the quote starts shortly before
 * the first word of the query as typed, else the first stemmed term, else at the beginning.
 */
(() => {
  "use strict";

  const REMOVE = [".headerlink", "script", "style", ".bd-header-article", ".d-print-none", "button", ".MathJax_Preview"];
  const CONTEXT = 120; // characters before the term (Sphinx's own value)
  const LENGTH = 240;

  function articleText(htmlString, anchor) {
    const doc = new DOMParser().parseFromString(htmlString, "text/html");
    const main = doc.querySelector('[role="main"]');
    const article = (main && main.querySelector("article.bd-article")) || main || doc.body;
    if (!article) return "";
    article.querySelectorAll(REMOVE.join(",")).forEach((el) => el.remove());
    let block = null;
    if (anchor) {
      try {
        block = article.querySelector(anchor);
      } catch (err) {
        block = null; // not a valid selector
      }
    }
    if (!block) {
      block = article;
      const title = article.querySelector("h1");
      if (title) title.remove(); // the result's link already shows it
    }
    return (block.textContent || "")
      .replace(/\\[()[\]]/g, "") // MathJax's delimiters \( \) \[ \]: the TeX itself reads well enough
      .replace(/\s+/g, " ")
      .trim();
  }

  function queryWords() {
    const query = new URLSearchParams(window.location.search).get("q") || "";
    return query
      .toLowerCase()
      .split(/\s+/)
      .filter((word) => word && !word.startsWith("-"));
  }

  function summary(htmlText, keywords, anchor) {
    const text = articleText(htmlText, anchor);
    if (!text) return null;
    const lower = text.toLowerCase();
    const candidates = [...queryWords(), ...(keywords ? [...keywords] : [])];
    let position = -1;
    for (const word of candidates) {
      position = lower.indexOf(word.toLowerCase());
      if (position > -1) break;
    }
    const start = Math.max(position - CONTEXT, 0);
    const top = start === 0 ? "" : "...";
    const tail = start + LENGTH < text.length ? "..." : "";
    const paragraph = document.createElement("p");
    paragraph.classList.add("context");
    paragraph.textContent = top + text.substr(start, LENGTH).trim() + tail;
    return paragraph;
  }

  function patch() {
    if (typeof Search === "undefined" || Search.pebookPatched) return typeof Search !== "undefined";
    Search.htmlToText = articleText;
    Search.makeSearchSummary = summary;
    Search.pebookPatched = true;
    return true;
  }

  if (!patch()) document.addEventListener("DOMContentLoaded", patch);
})();

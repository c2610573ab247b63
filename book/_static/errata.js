/* The errata chapter (book/errata.md): a filter bar for the error cards.
 *
 * Each error is a row of a list-table with the class "errata-cards" (styled as a card by
 * errata.css). Its first cell reads "E000-05 formula, major": the id, one or more kinds
 * separated by "/", and the severity. This script
 *   - gives each card the id as its anchor (errata.html#E000-05) and turns the first cell
 *     into the id, a badge per kind and a severity badge;
 *   - links mentions of an id in the chapter's text ("see E003-17") to its card;
 *   - inserts, before the first document's cards, a bar that filters the cards by kind, by
 *     severity and by a word they contain, and counts what is shown, in all and per document.
 * It runs offline, loads nothing, and does nothing on a page without errata cards. Without
 * it, every card is shown.
 */
(function () {
  "use strict";

  const ID_CELL = /^(E\d{3}-\d{2})\s+(.+?),\s*(major|minor)$/;
  const ID_MENTION = /\bE\d{3}-\d{2}\b/g;

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /* Read one row; restructure its first cell; return its record, or null. */
  function readCard(row, table) {
    const idCell = row.cells[0];
    if (!idCell || row.cells.length < 7) return null;
    const match = ID_CELL.exec(idCell.textContent.replace(/\s+/g, " ").trim());
    if (!match) return null;
    const [, id, kindText, severity] = match;
    const kinds = kindText.split("/").map((kind) => kind.trim()).filter(Boolean);

    if (!document.getElementById(id)) row.id = id;
    row.classList.add("errata-card", "errata-" + severity);
    row.dataset.kinds = kinds.join(" ");
    row.dataset.severity = severity;

    const header = element("p");
    const link = element("a", "errata-id", id);
    link.href = "#" + id;
    link.title = "Link to " + id;
    header.append(link, " ");
    for (const kind of kinds) header.append(element("span", "errata-kind", kind), " ");
    header.append(element("span", "errata-severity errata-severity-" + severity, severity));
    idCell.replaceChildren(header);
    row.cells[2].lang = "zh-Hans"; // the quote: the documents are in Chinese

    return { row, id, kinds, severity, table, text: "" };
  }

  /* Link "E003-17" in the chapter's text to the card with that id. */
  function linkMentions(root, ids) {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
      acceptNode(node) {
        if (!ID_MENTION.test(node.nodeValue)) return NodeFilter.FILTER_REJECT;
        ID_MENTION.lastIndex = 0;
        const skip = node.parentElement.closest("a, code, pre, h1, h2, h3, h4, h5, h6, .cell, .errata-filter, script, style");
        return skip ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT;
      },
    });
    const nodes = [];
    while (walker.nextNode()) nodes.push(walker.currentNode);
    for (const node of nodes) {
      const text = node.nodeValue;
      const pieces = [];
      let last = 0;
      for (const match of text.matchAll(ID_MENTION)) {
        if (!ids.has(match[0])) continue;
        pieces.push(text.slice(last, match.index));
        const link = element("a", "errata-mention", match[0]);
        link.href = "#" + match[0];
        pieces.push(link);
        last = match.index + match[0].length;
      }
      if (!pieces.length) continue;
      pieces.push(text.slice(last));
      node.replaceWith(...pieces.filter((piece) => piece !== ""));
    }
  }

  function init() {
    const tables = Array.from(document.querySelectorAll("table.errata-cards"));
    if (!tables.length) return;

    const cards = [];
    for (const table of tables) {
      for (const body of table.tBodies) {
        for (const row of body.rows) {
          const card = readCard(row, table);
          if (card) cards.push(card);
        }
      }
    }
    if (!cards.length) return;
    for (const card of cards) card.text = card.row.textContent.replace(/\s+/g, " ").toLowerCase();

    const ids = new Set(cards.map((card) => card.id));
    const article = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
    linkMentions(article, ids);

    /* One record per document: its cards and a status line shown while a filter is on. */
    const documents = tables.map((table) => {
      const box = table.closest(".pst-scrollable-table-container") || table;
      const status = element("p", "errata-doc-status");
      status.hidden = true;
      status.setAttribute("aria-live", "polite");
      box.before(status);
      return { table, box, status, cards: cards.filter((card) => card.table === table) };
    });

    /* Kinds, most frequent first; each card counts once per kind it has. */
    const kindTotals = new Map();
    for (const card of cards) for (const kind of card.kinds) kindTotals.set(kind, (kindTotals.get(kind) || 0) + 1);
    const kinds = Array.from(kindTotals.keys()).sort(
      (a, b) => kindTotals.get(b) - kindTotals.get(a) || a.localeCompare(b),
    );

    const state = { kind: "", severity: "", words: [] };

    /* The bar. */
    const bar = element("div", "errata-filter");
    bar.setAttribute("role", "search");
    bar.setAttribute("aria-label", "Filter the errors");

    function group(label) {
      const box = element("div", "errata-filter-group");
      box.setAttribute("role", "group");
      box.setAttribute("aria-label", label);
      box.append(element("span", "errata-filter-label", label));
      bar.append(box);
      return box;
    }

    function button(box, label, key, value) {
      const node = element("button", "", label);
      node.type = "button";
      node.dataset[key] = value;
      node.setAttribute("aria-pressed", String(state[key] === value));
      const count = element("span", "errata-count");
      node.append(count);
      node.addEventListener("click", () => {
        state[key] = state[key] === value && value !== "" ? "" : value;
        update();
      });
      box.append(node);
      return { node, count, key, value };
    }

    const buttons = [];
    const kindGroup = group("Kind");
    buttons.push(button(kindGroup, "all", "kind", ""));
    for (const kind of kinds) buttons.push(button(kindGroup, kind, "kind", kind));
    const severityGroup = group("Severity");
    buttons.push(button(severityGroup, "all", "severity", ""));
    for (const severity of ["major", "minor"]) buttons.push(button(severityGroup, severity, "severity", severity));

    const searchGroup = group("Text");
    const search = element("input");
    search.type = "search";
    search.placeholder = "a word, a formula, an id…";
    search.setAttribute("aria-label", "Show only the errors containing this text");
    search.addEventListener("input", () => {
      state.words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
      update();
    });
    searchGroup.append(search);

    const status = element("p", "errata-filter-status");
    status.setAttribute("aria-live", "polite");
    const statusText = element("span");
    const reset = element("button", "", "show all");
    reset.type = "button";
    reset.addEventListener("click", () => {
      clear();
      update();
    });
    status.append(statusText, reset);
    bar.append(status);

    /* Before the first document's section (after the introduction of the list). */
    const firstSection = tables[0].closest("section");
    const anchor = firstSection && firstSection.parentElement.closest("section") ? firstSection : documents[0].box;
    anchor.before(bar);

    function clear() {
      state.kind = "";
      state.severity = "";
      state.words = [];
      search.value = "";
    }

    function matches(card, ignore) {
      if (ignore !== "kind" && state.kind && !card.kinds.includes(state.kind)) return false;
      if (ignore !== "severity" && state.severity && card.severity !== state.severity) return false;
      return state.words.every((word) => card.text.includes(word));
    }

    function update() {
      let shown = 0;
      for (const card of cards) {
        card.row.hidden = !matches(card);
        if (!card.row.hidden) shown += 1;
      }
      for (const item of buttons) {
        item.node.setAttribute("aria-pressed", String(state[item.key] === item.value));
        const n = cards.filter((card) => matches(card, item.key) && (item.value === "" ||
          (item.key === "kind" ? card.kinds.includes(item.value) : card.severity === item.value))).length;
        item.count.textContent = String(n);
      }
      const filtering = Boolean(state.kind || state.severity || state.words.length);
      const what = [state.kind, state.severity, state.words.length ? "containing “" + state.words.join(" ") + "”" : ""]
        .filter(Boolean).join(", ");
      statusText.textContent = filtering
        ? `Showing ${shown} of ${cards.length} errors (${what}).`
        : `Showing all ${cards.length} errors.`;
      reset.hidden = !filtering;
      for (const doc of documents) {
        const visible = doc.cards.filter((card) => !card.row.hidden).length;
        doc.status.hidden = !filtering;
        doc.status.textContent = visible
          ? `${visible} of this document’s ${doc.cards.length} errors match.`
          : `None of this document’s ${doc.cards.length} errors matches.`;
        doc.box.hidden = filtering && visible === 0;
      }
    }

    /* A link to a card that the filter hides shows everything again. */
    function reveal() {
      const id = decodeURIComponent(location.hash.slice(1));
      const card = cards.find((item) => item.id === id);
      if (!card) return;
      if (card.row.hidden) {
        clear();
        update();
      }
      card.row.scrollIntoView();
    }

    update();
    window.addEventListener("hashchange", reveal);
    if (location.hash) reveal();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();

"""Author-year citations for the book (sphinxcontrib-bibtex 2.7, pybtex 0.26).

In the text, ``{cite:t}`Vaswani.2017``` gives "Vaswani et al. (2017)" and
``{cite:p}`Vaswani.2017``` gives "(Vaswani et al., 2017)"; several keys in one
``{cite:p}`` are separated by semicolons. The References page lists every cited work
under the same label, "Vaswani et al. 2017", sorted by author and then year.

Two works with the same authors' label and year get a letter after the year, both in the
list and in the text: "Touvron et al. (2023a)", "Touvron et al. (2023b)".

This extension registers three plugins, used from ``_config.yml``:

- ``pebook_author_year`` (sphinxcontrib-bibtex's ``sphinxcontrib.bibtex.style.referencing``
  group): the in-text style, ``bibtex_reference_style``;
- ``pebook`` (``pybtex.style.formatting``): pybtex's ``plain`` entry format, sorted by
  author, year and title, with the labels below and one link to arXiv per entry;
  ``bibtex_default_style``;
- ``pebook_author_year`` (``pybtex.style.labels``): the labels "Shazeer 2019",
  "Press and Wolf 2017" (two authors), "Vaswani et al. 2017" (three or more).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import pybtex.plugin
import sphinxcontrib.bibtex.plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.template import node, optional, sentence
from sphinx.application import Sphinx
from sphinxcontrib.bibtex.style.referencing import BracketStyle, PersonStyle
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle
from sphinxcontrib.bibtex.style.referencing.basic_author_year import (
    BasicAuthorYearParentheticalReferenceStyle,
    BasicAuthorYearTextualReferenceStyle,
)
from sphinxcontrib.bibtex.style.referencing.extra_author import ExtraAuthorReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_empty import ExtraEmptyReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_label import ExtraLabelReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_year import ExtraYearReferenceStyle
from sphinxcontrib.bibtex.style.template import join, join2, post_text, pre_text, reference

NAME = "pebook_author_year"
ET_AL = " et al."  # plain text, in the labels and in the text alike
NO_YEAR = "n.d."

# ----------------------------------------------------------------------------- labels


def _last_name(person) -> str:
    """'Le Scao', 'Rozière': the person's von and last parts, LaTeX decoded."""
    return str(Text.from_latex(" ".join(person.prelast_names + person.last_names)))


def _authors(entry) -> str:
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    if not persons:
        return str(Text.from_latex(entry.fields.get("title", entry.key)))
    names = [_last_name(person) for person in persons]
    if len(names) >= 3 or names[-1] == "others":  # bibtex's "and others"
        return names[0] + ET_AL
    return " and ".join(names)


class AuthorYearLabelStyle(BaseLabelStyle):
    """'Vaswani et al. 2017'; 'Touvron et al. 2023a' and '... 2023b' when two collide.

    The letters follow the order of the sorted list (author, year, title), so the
    first of the two in the References page is "a".
    """

    def format_labels(self, sorted_entries):
        entries = list(sorted_entries)
        labels = [f"{_authors(entry)} {entry.fields.get('year', NO_YEAR)}" for entry in entries]
        total = Counter(labels)
        seen: Counter = Counter()
        for label in labels:
            if total[label] > 1:
                yield label + "abcdefghijklmnopqrstuvwxyz"[seen[label]]
                seen[label] += 1
            else:
                yield label


class Style(PlainStyle):
    """pybtex's ``plain`` entries, sorted by author, year and title, with author-year labels.

    An entry whose ``url`` is its arXiv abstract page shows one link, "arXiv:2104.09864",
    not the same address twice ("URL: https://arxiv.org/abs/2104.09864, arXiv:2104.09864").
    """

    default_label_style = NAME
    default_sorting_style = "author_year_title"

    def format_web_refs(self, e):
        eprint = e.fields.get("eprint", "")
        url = e.fields.get("url", "").rstrip("/")
        if eprint and url in (f"https://arxiv.org/abs/{eprint}", f"http://arxiv.org/abs/{eprint}"):
            return sentence[
                optional[self.format_eprint(e)],
                optional[self.format_pubmed(e)],
                optional[self.format_doi(e)],
            ]
        return super().format_web_refs(e)


# ----------------------------------------------------------------------------- in the text

_LABEL_YEAR = re.compile(r"(?:\d{4}|n\.d\.)[a-z]?$")


@node
def label_year(children, data):
    """The year of a citation as its label ends: '2017', or '2023a' for a disambiguated one."""
    assert not children
    match = _LABEL_YEAR.search(data["formatted_entry"].label)
    if match:
        return Text(match.group(0))
    return Text(data["entry"].fields.get("year", NO_YEAR))


class _Parenthetical(BasicAuthorYearParentheticalReferenceStyle):
    def inner(self, role_name):
        return join2(sep1=self.pre_text_sep, sep2=self.post_text_sep)[
            pre_text,
            reference[
                join(sep=self.author_year_sep)[
                    self.person.author_or_editor_or_title(full="s" in role_name),
                    label_year,
                ]
            ],
            post_text,
        ]


class _Textual(BasicAuthorYearTextualReferenceStyle):
    def inner(self, role_name):
        return join(sep=self.text_reference_sep)[
            self.person.author_or_editor_or_title(full="s" in role_name),
            join[
                self.bracket.left,
                join2(sep1=self.pre_text_sep, sep2=self.post_text_sep)[pre_text, reference[label_year], post_text],
                self.bracket.right,
            ],
        ]


class _Year(ExtraYearReferenceStyle):
    def inner(self, role_name):
        return reference[label_year]


def _round(sep: str = ", ", sep2: str | None = None, last_sep: str | None = None) -> BracketStyle:
    return BracketStyle(left="(", right=")", sep=sep, sep2=sep2, last_sep=last_sep)


@dataclass
class ReferenceStyle(AuthorYearReferenceStyle):
    """``{cite:t}``: Vaswani et al. (2017); ``{cite:p}``: (Vaswani et al., 2017; Shaw et al., 2018)."""

    bracket_textual: BracketStyle = field(default_factory=lambda: _round(", ", " and ", ", and "))
    bracket_parenthetical: BracketStyle = field(default_factory=lambda: _round("; "))
    bracket_author: BracketStyle = field(default_factory=lambda: _round(", ", " and ", ", and "))
    bracket_label: BracketStyle = field(default_factory=lambda: _round("; "))
    bracket_year: BracketStyle = field(default_factory=lambda: _round(", "))
    person: PersonStyle = field(default_factory=lambda: PersonStyle(other=ET_AL))

    def __post_init__(self):
        # AuthorYearReferenceStyle.__post_init__, with the year taken from the label.
        self.styles.extend(
            [
                _Parenthetical(
                    bracket=self.bracket_parenthetical,
                    person=self.person,
                    author_year_sep=self.author_year_sep,
                    pre_text_sep=self.pre_text_sep,
                    post_text_sep=self.post_text_sep,
                ),
                _Textual(
                    bracket=self.bracket_textual,
                    person=self.person,
                    text_reference_sep=self.text_reference_sep,
                    pre_text_sep=self.pre_text_sep,
                    post_text_sep=self.post_text_sep,
                ),
                ExtraAuthorReferenceStyle(bracket=self.bracket_author, person=self.person),
                ExtraLabelReferenceStyle(bracket=self.bracket_label),
                _Year(bracket=self.bracket_year),
                ExtraEmptyReferenceStyle(),
            ]
        )
        # GroupReferenceStyle.__post_init__: map every role name to its style.
        super(AuthorYearReferenceStyle, self).__post_init__()


pybtex.plugin.register_plugin("pybtex.style.labels", NAME, AuthorYearLabelStyle)
pybtex.plugin.register_plugin("pybtex.style.formatting", "pebook", Style)
sphinxcontrib.bibtex.plugin.register_plugin("sphinxcontrib.bibtex.style.referencing", NAME, ReferenceStyle)


def setup(app: Sphinx) -> dict:
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""A small, offline sentence splitter for the IFEval sentence-count constraint.

Google's IFEval counts sentences with NLTK's Punkt model, whose ``punkt_tab`` data no PyPI
package ships; Ai2's ``verify_sentence_constraint`` uses a one-line regular expression. This
module is a regular-expression splitter with a little more care than Ai2's, and needs no data:

- a sentence ends at ``.``, ``!``, ``?``, ``…`` (or a run of them, e.g. ``?!`` or ``...``),
  optionally followed by closing quotes/brackets, then whitespace or the end of the text;
- CJK full stops (``。！？``) end a sentence without needing whitespace after them;
- a blank line (paragraph break) always ends a sentence, with or without punctuation;
- a period does not end a sentence after a known abbreviation (``Mr.``, ``Dr.``, ``e.g.``,
  ``etc.``, ``vs.``, ``U.S.``, …) or after a single-letter initial (``J. K. Rowling``);
- an ellipsis, or a mark inside closing quotes, followed by a lower-case word continues the
  sentence (``Wait... what?``, ``"Hi!" she said.``);
- numbers such as ``3.14`` never split (no whitespace after the period).

What it cannot do (Punkt learns these from data, a regex cannot): tell an abbreviation it does not
list from a sentence end (``approx. 5`` splits unless ``approx`` is listed), recognise a sentence
that ends in an abbreviation (``… in the U.S. It was …`` stays one sentence), split text that has
no terminal punctuation and no blank lines (a bullet list on single lines is one sentence), or
handle languages whose sentences end in other marks (Thai, Devanagari ``।``).
"""

from __future__ import annotations

import re

# Lower-case, without the trailing period. Multi-period ones are matched on their letters only
# ("e.g" -> "e.g", "u.s" -> "u.s").
ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al approx dept est fig figs no nos vol
    inc ltd co corp jan feb mar apr jun jul aug sep sept oct nov dec a.m p.m u.s u.k u.n ph.d
    gen col lt sgt capt rev hon
    """.split()
)

_BOUNDARY = re.compile(
    r"(?<![.!?\u2026])(?P<punct>[.!?\u2026]+)(?P<close>[\"'\u201d\u2019)\]]*)(?=\s|$)"
    r"|(?P<cjk>[\u3002\uff01\uff1f]+)"
    r"|(?P<blank>\n[ \t\r\f\v]*\n\s*)"
)
_WORD_BEFORE = re.compile(r"([\w.]+)$")


def _is_boundary(text: str, m: re.Match[str]) -> bool:
    if m.group("cjk") or m.group("blank"):
        return True
    punct = m.group("punct")
    if punct == "." and not m.group("close"):
        before = _WORD_BEFORE.search(text, max(0, m.start() - 40), m.start())
        if before:
            word = before.group(1).lower().strip(".")
            if word in ABBREVIATIONS:
                return False
            if len(word) == 1 and word.isalpha():  # an initial: "J. K. Rowling"
                return False
    if punct in ("...", "\u2026") or m.group("close"):  # 'Wait... what' / '"Hi!" she said'
        rest = text[m.end() : m.end() + 3].lstrip()
        if rest[:1].islower():
            return False
    return True


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences; see the module docstring for the rules and their limits.

    Returns the non-empty sentences (those with at least one letter or digit), stripped.
    """
    sentences: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        if _is_boundary(text, m):
            sentences.append(text[start : m.end()])
            start = m.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if any(ch.isalnum() for ch in s)]


def count_sentences(text: str) -> int:
    """Number of sentences in ``text`` (see :func:`split_sentences`)."""
    return len(split_sentences(text))

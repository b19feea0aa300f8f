"""The blow-up guard: whether a MATH answer may be handed to sympy, decided from its text alone.

sympy evaluates integer powers and factorials as it builds them, and ``simplify`` expands
polynomial powers, so a short answer can stall a worker for minutes: ``(10^{99999})^{99999}``,
``(10!)!``, ``\\binom{10^6}{500000}``, ``(x+1)^{1000}``. An answer is refused (it then gets the
string comparison only) when

- it is longer than :data:`MAX_ANSWER_CHARS` or nested deeper than :data:`MAX_BRACE_DEPTH`;
- it matches one of the literal patterns in ``_EXPLOSIVE``: a numeric exponent tower
  (``10^{10^{10}}``, ``e^{e^{e}}``, ``9**9**9``), an exponent of six digits or more, a factorial of
  four digits or more, ``\\uparrow``;
- its *size bound* is too large. The bound is computed over a loose reading of the text (numbers,
  letters and commands, groups in any bracket with ``\\left``/``\\right`` ignored, ``^``/``**``,
  ``!``, ``\\binom``/``\\choose``/``\\Gamma``, separators such as ``+``, ``,``, ``=``, ``&``) that
  over-estimates rather than under-estimates:
  ``digits`` bounds log10 of any number sympy could build (a power multiplies its base's digits by
  its exponent, a factorial of n has at most n·log10(n) digits) and must stay within
  :data:`MAX_DIGITS`; ``terms`` bounds how many terms a full expansion has ((a+b)^n has n+1) and
  ``terms × (1 + digits)`` must stay within :data:`MAX_EXPANSION`.

This reads characters, never evaluates anything, and runs in time linear in the answer's length.
"""

from __future__ import annotations

import math
import re

MAX_ANSWER_CHARS = 1000
"""Longer extracted answers (or ground truths) are compared as strings only."""
MAX_BRACE_DEPTH = 50
"""Answers nested deeper than this (any bracket) are compared as strings only."""
MAX_DIGITS = 100_000
"""Largest number of decimal digits an answer may make sympy build (``10^{99999}`` is allowed)."""
MAX_EXPANSION = 10_000
"""Largest terms × digits of an answer's expansion (``(x+1)^{120}`` is allowed, ``^{130}`` not)."""

_EXPLOSIVE = re.compile(
    r"\^\s*\{?\s*\(?\s*(?:[0-9.]+|e|\\pi)\s*\}?\s*\^"  # numeric tower: 10^{10^…}, e^{e^…}
    r"|\*\*\s*\(?\s*[0-9.]+\s*\)?\s*\*\*"  # 9**9**9
    r"|(?:\^|\*\*)\s*\{?\s*\(?\s*[0-9]{6,}"  # an exponent of six or more digits
    r"|[0-9]{4,}\s*!"  # a huge factorial
    r"|\\uparrow"
)

_SIZING = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])|\\middle")
_TOKEN = re.compile(
    r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"|(?P<pow>\^|\*\*)"
    r"|(?P<fact>!)"
    r"|(?P<open>\\\{|\\langle|[(\[{])"
    r"|(?P<close>\\\}|\\rangle|[)\]}])"
    r"|(?P<sep>[-+,;=<>&|]|\\\\|\\(?:pm|mp|le|leq|ge|geq|ne|neq|lt|gt|approx|cup|cap|to|in"
    r"|quad|qquad|text\s*\{\s*(?:or|and)\s*\})(?![a-zA-Z]))"
    r"|(?P<cmd>\\[a-zA-Z]+)"
    r"|(?P<sym>[a-zA-Z])"
    r"|(?P<other>\\.|\S)",
    re.DOTALL,
)
# Commands that combine the groups after them like a product would (their digits add up).
_NEUTRAL_COMMANDS = frozenset(
    "\\frac \\dfrac \\tfrac \\cfrac \\cdot \\times \\div \\circ \\prime \\displaystyle "
    "\\text \\textbf \\textit \\textrm \\mathrm \\mathbf \\mathit \\operatorname \\mbox".split()
)
_FACTORIAL_COMMANDS = frozenset(("\\binom", "\\dbinom", "\\tbinom", "\\Gamma"))
_LOG2 = math.log10(2)


class _Size:
    """Upper bounds for one sub-expression: log10 of its magnitude, its expanded term count."""

    __slots__ = ("digits", "terms", "symbolic")

    def __init__(self, digits: float = _LOG2, terms: float = 1.0, symbolic: bool = False):
        self.digits, self.terms, self.symbolic = digits, terms, symbolic


def _exp10(x: float) -> float:
    return math.inf if x > 300 else 10.0**x


def _number_digits(text: str) -> float:
    whole = text.split(".", 1)[0]
    if len(whole) > 15:
        return float(len(whole))
    return math.log10(max(float(text), 2.0))


def _power(base: _Size, exponent: _Size) -> _Size:
    n = _exp10(exponent.digits)  # the exponent is at most this
    if exponent.symbolic:  # 2^n, e^{x^2}: never expanded, numbers stay as large as the bound says
        return _Size(base.digits * n, base.terms, True)
    terms = base.terms
    if base.symbolic and terms > 1:  # (a+b+…)^n has at most (n+1)^(t-1) terms
        log_terms = (terms - 1) * math.log10(n + 1) if n != math.inf else math.inf
        terms = _exp10(log_terms)
    return _Size(base.digits * n, terms, base.symbolic)


def _product(a: _Size, b: _Size) -> _Size:
    return _Size(a.digits + b.digits, a.terms * b.terms, a.symbolic or b.symbolic)


def _factorial(arg: _Size) -> _Size:
    return _Size(max(_exp10(arg.digits) * arg.digits, _LOG2), arg.terms, arg.symbolic)


class _Reader:
    def __init__(self, text: str):
        self.tokens = [(m.lastgroup, m.group(0)) for m in _TOKEN.finditer(_SIZING.sub(" ", text))]
        self.at = 0

    def peek(self) -> tuple[str | None, str]:
        return self.tokens[self.at] if self.at < len(self.tokens) else (None, "")

    def sequence(self) -> _Size:
        """Items up to the matching close (or the end): products within a term, terms summed."""
        digits, count, terms, symbolic, choose = _LOG2, 0, 0.0, False, False
        term = None
        while True:
            kind, tok = self.peek()
            if kind == "sep" or kind is None or kind == "close":
                # |a + b + …| <= count × max: the digits of the largest term, plus log10(count).
                # A numeric term collapses to one number: it counts as one term only among symbols.
                if term is not None:  # not the empty term before a leading sign
                    digits, count = max(digits, term.digits), count + 1
                    terms += term.terms if term.symbolic else 1.0
                    symbolic |= term.symbolic
                if kind != "sep":
                    break
                self.at += 1
                term = None
                continue
            choose |= tok == "\\choose"
            item = self.item()
            term = item if term is None else _product(term, item)
        size = _Size(digits + math.log10(max(count, 1)), terms if symbolic else 1.0, symbolic)
        return _factorial(size) if choose else size

    def atom(self) -> _Size:
        kind, tok = self.peek()
        while kind == "sep":  # a sign right after ^ (10^-5): read what follows it
            self.at += 1
            kind, tok = self.peek()
        if kind is None or kind == "close":
            return _Size()
        self.at += 1
        if kind == "num":
            return _Size(_number_digits(tok))
        if kind == "open":
            inner = self.sequence()
            if self.peek()[0] == "close":
                self.at += 1
            return inner
        if kind == "cmd":
            if tok in _FACTORIAL_COMMANDS:
                return _factorial(self.item())
            return _Size() if tok in _NEUTRAL_COMMANDS else _Size(symbolic=True)
        if kind == "sym":
            return _Size(symbolic=True)
        return _Size()  # pow/fact with nothing before them, punctuation: no size of their own

    def item(self) -> _Size:
        """An atom with its postfix factorials and a right-associative chain of exponents."""
        parts = [self.postfix(self.atom())]
        while self.peek()[0] == "pow":
            self.at += 1
            if self.peek()[0] in (None, "close", "pow"):
                break
            parts.append(self.postfix(self.atom()))
        size = parts.pop()
        while parts:
            size = _power(parts.pop(), size)
        return self.postfix(size)

    def postfix(self, size: _Size) -> _Size:
        while self.peek()[0] == "fact":
            self.at += 1
            size = _factorial(size)
        return size

    def read(self) -> _Size:
        total = self.sequence()
        while self.at < len(self.tokens):  # a stray close bracket ended the sequence: go on after it
            self.at += 1
            total = _product(total, self.sequence())
        return total


def size_bound(answer: str) -> tuple[float, float]:
    """(digits, terms) upper bounds for ``answer``; see the module docstring."""
    try:
        size = _Reader(answer).read()
    except RecursionError:  # a chain of \\binom or \\langle deeper than the stack: no bound
        return math.inf, math.inf
    return size.digits, size.terms


def _bracket_depth(text: str) -> int:
    depth = best = 0
    for ch in text:
        if ch in "{([":
            depth += 1
            best = max(best, depth)
        elif ch in "})]":
            depth -= 1
    return best


def symbolic_safe(answer: str) -> bool:
    """Whether ``answer`` may be handed to sympy (see the module docstring)."""
    if len(answer) > MAX_ANSWER_CHARS or _bracket_depth(answer) > MAX_BRACE_DEPTH:
        return False
    if _EXPLOSIVE.search(answer):
        return False
    digits, terms = size_bound(answer)
    return digits <= MAX_DIGITS and (terms <= 1 or terms * (1.0 + digits) <= MAX_EXPANSION)

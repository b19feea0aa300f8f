"""MATH (Hendrycks et al.): extract the one final answer, then test it against the ground truth.

The rule (:data:`MATH_RULE`): **an answer earns the reward only if the whole extracted answer
parses as one expression equivalent to the ground truth** (or equals it as a normalised string).
An answer that lists several candidates (``3 \\text{ or } 5``, ``3, 5``, ``\\pm 5`` when the gold
is 5) or does not parse as a whole (``3 ? 5``, ``3 \\\\ 5``, ``(3, 5``, code) earns nothing: no
number is ever fished out of an answer that failed to parse, which is what math-verify's
fallback does (its ``parse`` retries with its expression regexes and takes a number inside).

Extraction: one final answer per completion, the first of

1. the content of the last top-level ``\\boxed{…}`` (or ``\\fbox{…}``; nested braces, escaped
   ``\\{``/``\\}`` ignored; a box inside a box belongs to it), or ``\\boxed 5``; an unclosed last
   box is a malformed answer (nothing);
2. only if there is no box: Minerva's ``Final Answer: The final answer is X. I hope it is
   correct.`` (the last one; the ``I hope…`` tail is optional);
3. only if neither is present: the last ``$…$`` span.

Deviations from open-instruct's ``verify_math_sample``: it credits *any* of these candidates (a
box saying 3 and a Minerva line saying 5 earned the reward for both) and finally the whole
completion; here one answer is judged, and a completion with no answer in one of these forms is
unverified.

Equivalence: a normalised string comparison first, then the answer and the gold are each parsed
whole (math-verify's LaTeX normalisation, then ``latex2sympy``) and compared with
``math_verify.verify`` (its ``signal.alarm`` time-out off: the scorer enforces time-outs by
killing the worker process, which also works off the main thread). Repeating decimals
(``0.1\\overline{6}``) are read as fractions. One trailing unit is dropped (``2\\text{ cm}``,
``5 cm``): a ``\\text{…}`` of words only, since math-verify's own unit regex would cut
``5 \\text{ (or } 6\\text{)}`` down to ``5``. An equation is credited against a gold that is not
one only when every side equals the gold, apart from a leading name: ``x = 5`` and
``x = 2 + 3 = 5`` earn the reward for 5, ``3 = -3`` earns nothing for -3. Answers that could make
sympy build astronomically large numbers or expansions get the string comparison only (see
:mod:`tulu.rewards.sympy_guard`).
"""

from __future__ import annotations

import functools
import logging
import re

from tulu.rewards.sympy_guard import symbolic_safe
from tulu.rewards.verifier import Verifier

MATH_RULE = (
    "MATH: one final answer counts (the last \\boxed{}, else 'The final answer is X', else the "
    "last $...$); it earns the reward only if the whole answer parses as one expression "
    "equivalent to the ground truth - an answer that lists several candidates or does not parse "
    "as a whole earns nothing"
)
"""The MATH reward rule in one line, as ``tulu score`` prints it."""

_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])|\\.|[{}]", re.DOTALL)
_BOXED_WORD = re.compile(r"[^\s$]+")


def _last_box(text: str) -> tuple[int, int, str | None] | None:
    """(start, end, content) of the last top-level box; content None when it is never closed.

    One pass over the braces: a box that opens inside another box belongs to the outer one.
    """
    last = None
    stack: list[int | None] = []  # per open brace: the start of the box it opens, else None
    open_boxes = 0
    box_at = None  # a box command waiting for its "{"
    for m in _BOX_TOKEN.finditer(text):
        tok = m.group(0)
        if tok in ("\\boxed", "\\fbox"):
            j = m.end()
            while j < len(text) and text[j] in " \t":
                j += 1
            if j < len(text) and text[j] == "{":
                box_at = m.start()
            elif j > m.end() and open_boxes == 0:  # "\boxed 5": up to the next space or dollar
                word = _BOXED_WORD.match(text, j)
                if word:
                    last = (m.start(), word.end(), word.group(0))
            continue
        if tok == "{":
            stack.append(box_at)
            open_boxes += box_at is not None
        elif tok == "}" and stack:
            start = stack.pop()
            if start is not None:
                open_boxes -= 1
                if open_boxes == 0:
                    content_at = text.index("{", start)
                    last = (start, m.end(), text[content_at + 1 : m.start()])
        box_at = None
    if open_boxes:  # the last top-level box is never closed: a malformed answer
        start = next(s for s in stack if s is not None)
        return (start, len(text), None)
    return last


def last_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{…}``/``\\fbox{…}``/``\\boxed X``, or None."""
    box = _last_box(text)
    return box[2] if box else None


_MINERVA = re.compile(r"final answer is", re.IGNORECASE)


def _minerva(text: str) -> tuple[int, str | None] | None:
    last = None
    for last in _MINERVA.finditer(text):
        pass
    if last is None:
        return None
    tail = text[last.end() :]
    hope = tail.find("I hope it is correct")
    line = tail[:hope] if hope >= 0 else tail.split("\n", 1)[0]
    answer = line.strip().rstrip(".").strip().strip("$").strip()
    return last.start(), answer or None


def minerva_answer(text: str) -> str | None:
    """X in the last ``The final answer is X. I hope it is correct.``, or None."""
    found = _minerva(text)
    return found[1] if found else None


def last_dollar_span(text: str) -> str | None:
    """Content between the last two ``$`` signs, or None."""
    end = text.rfind("$")
    if end <= 0:
        return None
    start = text.rfind("$", 0, end)
    if start < 0:
        return None
    answer = text[start + 1 : end].strip()
    return answer or None


def final_answer(completion: str) -> str | None:
    """The completion's one final answer (see the module docstring), or None."""
    box = _last_box(completion)
    if box:
        return box[2]
    minerva = _minerva(completion)
    if minerva:
        return minerva[1]
    return last_dollar_span(completion)


_STRIP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\$|\s+|\\displaystyle")


def normalize_answer(answer: str) -> str:
    """A string form for the fast equality test (spacing, sizing and ``dfrac`` ignored)."""
    s = _STRIP.sub("", answer)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    return s.rstrip(".")


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify

    # Without signal.alarm it warns on every call; the scorer's process pool enforces time-outs.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


# A unit is words: no digit (but a power, "m^2"), no bracket or comma that could hide a candidate.
_TRAILING_UNIT = re.compile(r"\\(?:text|mbox)\s*\{(?:[A-Za-z\s.'/]|\^\d)*\}(?:\^\d|\{\^\d\})?\s*$")


@functools.lru_cache(maxsize=1)
def _latex():
    """math-verify's LaTeX normaliser (its own unit stripping off) and parser, imported once."""
    from latex2sympy2_extended.latex2sympy2 import latex2sympy
    from latex2sympy2_extended.math_normalization import NormalizationConfig, normalize_latex, units_regex
    from math_verify.grader import should_treat_as_complex

    _math_verify()  # quiets its logger
    config = NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="none", equations=False
    )
    normalize = functools.partial(normalize_latex, config=config)
    return latex2sympy, normalize, units_regex, should_treat_as_complex


def _unbox(text: str) -> str:
    """``\\boxed{\\boxed{5}}`` is ``5``: a box that is the whole answer is its content."""
    box = _last_box(text)
    while box and box[0] == 0 and box[1] == len(text) and box[2]:
        text = box[2].strip()
        box = _last_box(text)
    return text


def _strip_unit(text: str, units_regex) -> str:
    """Drop one trailing ``\\text{…}`` unit and one trailing unit word (``2\\text{ cm}``, ``5 cm``)."""
    for unit, keep in ((_TRAILING_UNIT, ""), (units_regex, r"\1")):
        stripped = unit.sub(keep, text).strip()
        if stripped:
            text = stripped
    return text


_REPEATING = re.compile(r"(\d*)\.(\d*)\\overline\{(\d{1,50})\}")


def _repeating_to_fraction(m: re.Match) -> str:
    """``0.1\\overline{6}`` as ``\\frac{1}{6}`` (the parser has no repeating decimals)."""
    whole, fixed, repeat = m.group(1) or "0", m.group(2), m.group(3)
    numerator = int(whole + fixed + repeat) - int(whole + fixed or "0")
    denominator = 10 ** len(fixed) * (10 ** len(repeat) - 1)
    return f"\\frac{{{numerator}}}{{{denominator}}}"


@functools.lru_cache(maxsize=4096)
def _parse(answer: str):
    """The whole of ``answer`` as one sympy object, or None when it does not parse as a whole."""
    latex2sympy, normalize, units_regex, treat_as_complex = _latex()
    text = _REPEATING.sub(_repeating_to_fraction, _unbox(answer.strip().rstrip(".").rstrip()))
    text = _strip_unit(normalize(text), units_regex)
    if not text:
        return None
    try:
        return latex2sympy(text, is_real=not treat_as_complex(text), convert_degrees=False,
                           normalization_config=None)
    except Exception:  # the parser raises bare Exceptions for syntax errors
        return None


def _equation_sides(expr) -> list | None:
    """All sides of an equation or an equation chain ``a = b = c``; None for anything else."""
    from sympy import And, Eq

    relations = list(getattr(expr, "_unsorted_args", expr.args)) if isinstance(expr, And) else [expr]
    if not relations or not all(isinstance(r, Eq) for r in relations):
        return None
    return [side for r in relations for side in (r.lhs, r.rhs)]


def _equivalent(gold, candidate) -> bool:
    mv = _math_verify()
    if _equation_sides(gold) is None:
        sides = _equation_sides(candidate)
        if sides is not None:  # x = 5, x = 2 + 3 = 5: each side but a leading name must be the gold
            from latex2sympy2_extended.latex2sympy2 import is_expr_of_only_symbols

            if is_expr_of_only_symbols(sides[0]):
                sides = sides[1:]
            return bool(sides) and all(_equivalent(gold, side) for side in sides)
    return bool(mv.verify(gold, candidate, timeout_seconds=None))


def answers_equivalent(candidate: str, gold: str) -> bool:
    """Whether the whole of ``candidate`` is the same answer as ``gold`` (string, then sympy)."""
    if normalize_answer(candidate) == normalize_answer(gold):
        return True
    if not (symbolic_safe(candidate) and symbolic_safe(gold)):
        return False
    gold_parsed, cand_parsed = _parse(gold), _parse(candidate)
    if gold_parsed is None or cand_parsed is None:
        return False
    return _equivalent(gold_parsed, cand_parsed)


class MATHVerifier(Verifier):
    """The completion's final answer earns the reward only if the whole of it parses as one
    expression equivalent to the ground truth (or equals it as a normalised string); an answer
    that lists several candidates or does not parse as a whole earns nothing (see the module
    docstring and :data:`MATH_RULE`).

    The ground truth is the bare answer (Ai2's RLVR data: ``\\frac{1}{2}``); a ground truth that
    holds a ``\\boxed{…}`` is reduced to its content.
    """

    name = "MATH"

    def verify(self, completion: str, ground_truth: str) -> bool:
        gold = str(ground_truth)
        gold = (last_boxed(gold) or gold).strip().strip("$").strip()
        if not gold:
            raise ValueError("MATH ground truth is empty")
        answer = final_answer(completion)
        return bool(answer) and answers_equivalent(answer, gold)

"""MATH (Hendrycks et al.): extract the final answer, then test equivalence with ``math-verify``.

Extraction, in the order open-instruct's ``verify_math_sample`` tries it:

1. the content of the last ``\\boxed{…}`` (or ``\\fbox{…}``; nested braces, escaped ``\\{``/``\\}``
   ignored), or ``\\boxed 5``;
2. Minerva's ``Final Answer: The final answer is X. I hope it is correct.`` (the last one; the
   ``I hope…`` tail is optional);
3. only if neither is present: the last ``$…$`` span.

Deviation: open-instruct finally falls back to the whole completion; here a completion with no
answer in one of these forms is unverified.

Each candidate is first compared as a normalised string, then (if that fails) through
``math_verify.parse``/``math_verify.verify`` with their ``signal.alarm`` time-outs switched off
(``parsing_timeout=None, timeout_seconds=None``): the scorer enforces time-outs by killing the
worker process instead, which also works off the main thread. Candidates that would make sympy
build astronomically large numbers (numeric exponent towers such as ``10^{10^{10}}``, ``e^{e^{e}}`` or
``9**9**9``, exponents of six digits or more, factorials of four digits or more), answers longer
than :data:`MAX_ANSWER_CHARS`, and answers nested deeper than :data:`MAX_BRACE_DEPTH` get the
string comparison only.
"""

from __future__ import annotations

import functools
import logging
import re

from tulu.rewards.verifier import Verifier

MAX_ANSWER_CHARS = 1000
"""Longer extracted answers (or ground truths) are compared as strings only."""
MAX_BRACE_DEPTH = 50
"""Answers nested deeper than this are compared as strings only."""

_BOX_COMMANDS = ("\\boxed", "\\fbox")


_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


def _match_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_at`` (escaped braces skipped), or None."""
    depth = 0
    for m in _BRACE_TOKEN.finditer(text, open_at):
        tok = m.group(0)
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}``/``\\fbox{…}``/``\\boxed X`` in ``text``, or None."""
    at, cmd = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if at < 0:
        return None
    rest = at + len(cmd)
    j = rest
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        close = _match_brace(text, j)
        return None if close is None else text[j + 1 : close]
    if j > rest:  # "\boxed 5": up to the next space or dollar
        m = re.match(r"[^\s$]+", text[j:])
        return m.group(0) if m else None
    return None


_MINERVA = re.compile(r"final answer is", re.IGNORECASE)


def minerva_answer(text: str) -> str | None:
    """X in the last ``The final answer is X. I hope it is correct.``, or None."""
    last = None
    for last in _MINERVA.finditer(text):
        pass
    if last is None:
        return None
    tail = text[last.end() :]
    hope = tail.find("I hope it is correct")
    line = tail[:hope] if hope >= 0 else tail.split("\n", 1)[0]
    answer = line.strip().rstrip(".").strip().strip("$").strip()
    return answer or None


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


def extract_answers(completion: str) -> list[str]:
    """Candidate final answers of a completion, in the order they are tried."""
    found = [a for a in (last_boxed(completion), minerva_answer(completion)) if a]
    if not found:
        span = last_dollar_span(completion)
        if span:
            found.append(span)
    return found


_STRIP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\$|\s+|\\displaystyle")


def normalize_answer(answer: str) -> str:
    """A string form for the fast equality test (spacing, sizing and ``dfrac`` ignored)."""
    s = _STRIP.sub("", answer)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    return s.rstrip(".")


_EXPLOSIVE = re.compile(
    r"\^\s*\{?\s*\(?\s*(?:[0-9.]+|e|\\pi)\s*\}?\s*\^"  # numeric tower: 10^{10^…}, e^{e^…}
    r"|\*\*\s*\(?\s*[0-9.]+\s*\)?\s*\*\*"  # 9**9**9
    r"|(?:\^|\*\*)\s*\{?\s*\(?\s*[0-9]{6,}"  # an exponent of six or more digits
    r"|[0-9]{4,}\s*!"  # a huge factorial
    r"|\\uparrow"
)


def _brace_depth(text: str) -> int:
    depth = best = 0
    for ch in text:
        if ch == "{":
            depth += 1
            best = max(best, depth)
        elif ch == "}":
            depth -= 1
    return best


def symbolic_safe(answer: str) -> bool:
    """Whether ``answer`` may be handed to sympy (see the module docstring)."""
    return (
        len(answer) <= MAX_ANSWER_CHARS
        and _brace_depth(answer) <= MAX_BRACE_DEPTH
        and not _EXPLOSIVE.search(answer)
    )


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify

    # Without signal.alarm it warns on every call; the scorer's process pool enforces time-outs.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse(answer: str):
    mv = _math_verify()
    return mv.parse(f"${answer}$", parsing_timeout=None)


def answers_equivalent(candidate: str, gold: str) -> bool:
    """Whether ``candidate`` is the same answer as ``gold`` (string, then math-verify)."""
    if normalize_answer(candidate) == normalize_answer(gold):
        return True
    if not (symbolic_safe(candidate) and symbolic_safe(gold)):
        return False
    gold_parsed, cand_parsed = _parse(gold), _parse(candidate)
    if not gold_parsed or not cand_parsed:
        return False
    return bool(_math_verify().verify(gold_parsed, cand_parsed, timeout_seconds=None))


class MATHVerifier(Verifier):
    """Any extracted answer of the completion is equivalent to the ground-truth answer.

    The ground truth is the bare answer (Ai2's RLVR data: ``\\frac{1}{2}``); a ground truth that
    holds a ``\\boxed{…}`` is reduced to its content.
    """

    name = "MATH"

    def verify(self, completion: str, ground_truth: str) -> bool:
        gold = str(ground_truth)
        gold = (last_boxed(gold) or gold).strip().strip("$").strip()
        if not gold:
            raise ValueError("MATH ground truth is empty")
        return any(answers_equivalent(c, gold) for c in extract_answers(completion))

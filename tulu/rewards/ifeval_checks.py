"""The 25 IFEval instruction checkers, under the names Ai2's RLVR data uses.

Each row of Ai2's IFEval RLVR data (e.g. ``allenai/RLVR-GSM-MATH-IF-Mixed-Constraints``) names
one checker of open-instruct's ``if_functions.py`` in ``ground_truth["func_name"]`` and gives its
arguments by the same names (``N``, ``quantifier``, ``keyword_list``, …). The functions here keep
those names and argument names, and Ai2's meaning, so the data drops in unchanged. Where Ai2's
checker is plainly wrong, this one follows Google's IFEval instead; each such place says
"Deviation" in its docstring. Nothing here executes or evaluates model output.

All checkers take the response text first and return a bool. Bad *arguments* (from the data, not
the model) raise :class:`ConstraintError`, which the scorer counts as an error.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable

from tulu.rewards.sentences import count_sentences


class ConstraintError(ValueError):
    """The ground truth of an IFEval row is malformed (unknown func_name, bad argument)."""


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise ConstraintError(f"argument {name!r} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    raise ConstraintError(f"argument {name!r} must be an integer, got {value!r}")


def _as_str_list(value: object, name: str) -> list[str]:
    """A list of strings; a string holding a list/tuple literal or comma-separated items is split."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "([" and len(text) < 10_000:
            try:  # ground truth is trusted data; literal_eval evaluates literals only
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                parsed = None
            if isinstance(parsed, (list, tuple)):
                return [str(v) for v in parsed]
        return [part.strip() for part in text.split(",") if part.strip()]
    raise ConstraintError(f"argument {name!r} must be a list of strings, got {value!r}")


_QUANTIFIERS = ("at least", "at most", "around", "less than", "more than")


def _compare(actual: int, n: int, quantifier: str, around_tolerance: int) -> bool:
    q = str(quantifier).strip().lower()
    if q == "at least":
        return actual >= n
    if q == "at most":
        return actual <= n
    if q == "around":
        return abs(actual - n) <= around_tolerance
    if q == "less than":
        return actual < n
    if q == "more than":
        return actual > n
    raise ConstraintError(f"unknown quantifier {quantifier!r}; expected one of {list(_QUANTIFIERS)}")


# --- keywords ---------------------------------------------------------------------------------


def verify_keywords(text: str, keyword_list: object) -> bool:
    """Every keyword occurs (case-insensitive substring)."""
    lower = text.lower()
    return all(k.lower() in lower for k in _as_str_list(keyword_list, "keyword_list"))


def verify_keyword_frequency(text: str, word: str, N: object) -> bool:
    """The word occurs exactly N times as a whole word (case-insensitive)."""
    n = _as_int(N, "N")
    target = str(word).lower()
    return sum(1 for w in re.findall(r"\b\w+\b", text.lower()) if w == target) == n


def validate_forbidden_words(text: str, forbidden_words: object) -> bool:
    """None of the forbidden words occurs (case-insensitive substring, as Ai2)."""
    lower = text.lower()
    return not any(w.lower() in lower for w in _as_str_list(forbidden_words, "forbidden_words"))


def verify_letter_frequency(text: str, letter: str, N: object) -> bool:
    """The letter occurs exactly N times (case-sensitive, as Ai2)."""
    if not isinstance(letter, str) or len(letter) != 1:
        raise ConstraintError(f"argument 'letter' must be one character, got {letter!r}")
    return text.count(letter) == _as_int(N, "N")


# --- language ---------------------------------------------------------------------------------

LANGUAGE_SAMPLE_CHARS = 20_000


def validate_response_language(text: str, language: str) -> bool:
    """langdetect's best guess equals the ISO 639-1 code (``DetectorFactory.seed = 0``).

    Text with no detectable features (empty, digits only) is not in any language: False.
    Deviation: of a text longer than :data:`LANGUAGE_SAMPLE_CHARS`, only the first and last
    halves of that many characters are judged.
    """
    import langdetect
    from langdetect.lang_detect_exception import LangDetectException

    if len(text) > LANGUAGE_SAMPLE_CHARS:  # langdetect is ~2 s per MB; judge the two ends
        half = LANGUAGE_SAMPLE_CHARS // 2
        text = text[:half] + "\n" + text[-half:]
    langdetect.DetectorFactory.seed = 0
    try:
        return langdetect.detect(text) == str(language).strip().lower()
    except LangDetectException:
        return False


# --- length -----------------------------------------------------------------------------------


def verify_paragraph_count(text: str, N: object) -> bool:
    """Exactly N non-empty paragraphs separated by the markdown divider ``* * *``."""
    n = _as_int(N, "N")
    cleaned = "\n".join(line.strip() for line in text.splitlines()).strip()
    paragraphs = cleaned.split("* * *")
    if any(not p.strip() for p in paragraphs):
        return False
    return len(paragraphs) == n


def validate_word_constraint(text: str, N: object, quantifier: str) -> bool:
    """Whitespace-separated word count vs N; ``around`` allows ±max(round(N/10), 1)."""
    n = _as_int(N, "N")
    return _compare(len(text.split()), n, quantifier, max(round(n * 0.1), 1))


def verify_sentence_constraint(text: str, N: object, quantifier: str) -> bool:
    """Sentence count vs N; ``around`` allows ±1 (as Ai2).

    Deviation: sentences are counted with :mod:`tulu.rewards.sentences` (offline regex splitter,
    knows abbreviations and initials) instead of Ai2's one-line regex.
    """
    return _compare(count_sentences(text), _as_int(N, "N"), quantifier, 1)


def validate_paragraphs(text: str, N: object, first_word: str, i: object) -> bool:
    """Exactly N paragraphs separated by blank lines; the i-th (1-based) starts with first_word.

    Deviation: Ai2 splits on exactly ``"\\n\\n"`` and tests ``startswith`` (so "Theory" starts with
    "The"); here a blank line may hold spaces, an empty paragraph fails, and the first word is
    compared whole, case-insensitively, ignoring leading quotes/markdown and trailing punctuation
    (Google's rule). An ``i`` outside 1..N is a malformed ground truth.
    """
    n, idx = _as_int(N, "N"), _as_int(i, "i")
    if not 1 <= idx <= n:
        raise ConstraintError(f"argument 'i'={idx} outside 1..N={n}")
    paragraphs = re.split(r"\n[ \t\r\f\v]*\n", text.strip())
    if len(paragraphs) != n or any(not p.strip() for p in paragraphs):
        return False
    words = paragraphs[idx - 1].split()
    if not words:
        return False
    got = re.sub(r"^\W+|\W+$", "", words[0]).lower()
    return got == str(first_word).strip().lower()


# --- detectable content -----------------------------------------------------------------------


def verify_postscript(text: str, postscript_marker: str) -> bool:
    """The marker (e.g. ``P.S.``) occurs and some text follows it."""
    marker = str(postscript_marker)
    at = text.find(marker)
    if at < 0:
        return False
    return len(text[at:].strip()) > len(marker.strip())


def validate_placeholders(text: str, N: object) -> bool:
    """At least N placeholders in square brackets, e.g. ``[address]`` (innermost brackets, one line)."""
    return len(re.findall(r"\[[^\[\]\n]*\]", text)) >= _as_int(N, "N")


# --- detectable format ------------------------------------------------------------------------

_BULLET = re.compile(r"^[ \t]*[*\-+][ \t]+\S", re.MULTILINE)
_DIVIDER = re.compile(r"^[ \t]*(?:[*\-_][ \t]*){3,}$", re.MULTILINE)


def verify_bullet_points(text: str, N: object) -> bool:
    """Exactly N markdown bullet points (lines starting with ``*``, ``-`` or ``+`` and a space).

    Deviation: Ai2 counts every line starting with ``*`` or ``-`` (so ``**Bold**`` and ``---``
    count); here the marker must be followed by a space, and dividers such as ``* * *`` do not count.
    """
    bullets = sum(1 for m in _BULLET.finditer(text) if not _DIVIDER.match(text, m.start()))
    return bullets == _as_int(N, "N")


def validate_title(text: str) -> bool:
    """A title wrapped in double angular brackets, e.g. ``<<poem of joy>>``.

    Deviation: the title must not be blank (Google's rule; Ai2 accepts ``<<>>``), and holds no
    ``<``/``>`` (which keeps the search linear on adversarial input).
    """
    return any(t.strip() for t in re.findall(r"<<([^\n<>]*)>>", text))


def validate_choice(text: str, options: object) -> bool:
    """The response contains one of the options (substring, as Ai2).

    ``options`` may be a list, a string holding a list/tuple literal, or comma-separated items.
    """
    opts = _as_str_list(options, "options")
    return any(o and o in text for o in opts)


def validate_highlighted_sections(text: str, N: object) -> bool:
    """At least N highlighted sections, ``*like this*`` or ``**like this**``.

    Deviation: Ai2 counts any ``*…*`` pair, including empty ones and pairs across lines; here (as
    Google) a highlight is on one line and not blank.
    """
    single = [h for h in re.findall(r"\*[^\n*]*\*", text) if h.strip("* ")]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", text) if h.strip("* ")]
    return len(single) + len(double) >= _as_int(N, "N")


def validate_sections(text: str, N: object, section_splitter: str) -> bool:
    """At least N sections, each headed ``<splitter> <number>`` (e.g. ``SECTION 1``)."""
    pattern = r"\s?" + re.escape(str(section_splitter).strip()) + r"\s?\d+\s?"
    return len(re.split(pattern, text, flags=re.IGNORECASE)) - 1 >= _as_int(N, "N")


def validate_json_format(text: str) -> bool:
    """The whole response is one JSON value.

    Deviation: a surrounding markdown code fence (```json … ```) is removed first (Google's rule).
    Deeply nested input that exhausts the parser's recursion is not JSON.
    """
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and len(body) >= 6:
        body = body[3:-3]
        if body[:4].lower() == "json":
            body = body[4:]
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


# --- combination ------------------------------------------------------------------------------


def validate_repeat_prompt(text: str, original_prompt: str) -> bool:
    """The response starts with the prompt, unchanged."""
    return text.startswith(str(original_prompt).strip())


def validate_two_responses(text: str) -> bool:
    """Two different responses separated by exactly one ``******``.

    Deviation: both responses must be non-empty (Google's rule).
    """
    if text.count("******") != 1:
        return False
    first, second = (part.strip() for part in text.split("******"))
    return bool(first) and bool(second) and first != second


# --- case -------------------------------------------------------------------------------------


def validate_uppercase(text: str) -> bool:
    """No lower-case letters (the text equals its upper-case form)."""
    return text == text.upper()


def validate_lowercase(text: str) -> bool:
    """No upper-case letters (the text equals its lower-case form)."""
    return text == text.lower()


def validate_frequency_capital_words(text: str, N: object, quantifier: str) -> bool:
    """Count of all-capital words (``\\b[A-Z]+\\b``) vs N; ``around`` allows ±max(round(N/10), 1)."""
    n = _as_int(N, "N")
    return _compare(len(re.findall(r"\b[A-Z]+\b", text)), n, quantifier, max(round(n * 0.1), 1))


# --- start / end ------------------------------------------------------------------------------


def validate_end(text: str, end_phrase: str) -> bool:
    """The response ends with the exact phrase (surrounding whitespace ignored)."""
    return text.endswith(str(end_phrase).strip())


def validate_quotation(text: str) -> bool:
    """The whole response is wrapped in double quotation marks."""
    return len(text) >= 2 and text.startswith('"') and text.endswith('"')


# --- punctuation ------------------------------------------------------------------------------

_COMMAS = (",", "\uff0c", "\ufe50")  # ASCII, fullwidth, small comma


def validate_no_commas(text: str) -> bool:
    """No commas. Deviation: the fullwidth and small commas (U+FF0C, U+FE50) count as commas too."""
    return not any(c in text for c in _COMMAS)


IF_FUNCTIONS: dict[str, Callable[..., bool]] = {
    f.__name__: f
    for f in (
        verify_keywords,
        verify_keyword_frequency,
        validate_forbidden_words,
        verify_letter_frequency,
        validate_response_language,
        verify_paragraph_count,
        validate_word_constraint,
        verify_sentence_constraint,
        validate_paragraphs,
        verify_postscript,
        validate_placeholders,
        verify_bullet_points,
        validate_title,
        validate_choice,
        validate_highlighted_sections,
        validate_sections,
        validate_json_format,
        validate_repeat_prompt,
        validate_two_responses,
        validate_uppercase,
        validate_lowercase,
        validate_frequency_capital_words,
        validate_end,
        validate_quotation,
        validate_no_commas,
    )
}
"""The 25 checkers by Ai2's ``func_name``."""

FUNC_NAME_ALIASES = {"validate_postscript": "verify_postscript"}
"""Other spellings accepted for ``func_name``."""

"""GSM8K: the last number in the completion must equal the ground-truth number."""

from __future__ import annotations

import re

from tulu.rewards.verifier import Verifier

# A number: ASCII digits only (fullwidth or other-script digits are not numbers here), thousands
# commas only in groups of three ("1,234"; "1,2,3" is three numbers), optional decimals, and a
# leading minus only when it is not a hyphen or a subtraction ("10-20" is 10 and 20; "= -5" is -5).
_NUMBER = re.compile(
    r"(?:(?<![\w)\].])-)?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)", re.ASCII
)


def normalize_number(text: str) -> str:
    """Canonical form of a number string: no ``$``/commas/``+``, no leading zeros, no trailing ``.0``.

    ``"$1,234.50"`` -> ``"1234.5"``, ``"72.0"`` -> ``"72"``, ``"-0"`` -> ``"0"``. Works on the
    string only (never ``int()``/``float()``), so a million-digit number costs linear time.
    """
    s = text.strip().replace("$", "").replace(",", "").replace(" ", "")
    sign = ""
    if s[:1] in "+-":
        sign, s = ("-" if s[0] == "-" else ""), s[1:]
    if s.endswith("."):
        s = s[:-1]
    if "." in s:
        whole, _, frac = s.partition(".")
        frac = frac.rstrip("0")
        s = f"{whole}.{frac}" if frac else whole
    whole, dot, frac = s.partition(".")
    whole = whole.lstrip("0") or "0"
    s = whole + dot + frac
    if s == "0":
        sign = ""
    return sign + s


def last_number(text: str) -> str | None:
    """The last number in ``text`` (as written), or None."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return last.group(0) if last else None


class GSM8KVerifier(Verifier):
    """Last number of the completion == ground truth, after :func:`normalize_number` on both.

    The ground truth may be a bare number (Ai2's RLVR data) or GSM8K's ``… #### 72`` answer.
    """

    name = "gsm8k"

    def verify(self, completion: str, ground_truth: str) -> bool:
        gt = str(ground_truth).rsplit("####", 1)[-1]
        gt_number = last_number(gt)
        if gt_number is None:
            raise ValueError(f"GSM8K ground truth has no number: {str(ground_truth)[:80]!r}")
        got = last_number(completion)
        return got is not None and normalize_number(got) == normalize_number(gt_number)

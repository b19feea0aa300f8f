"""IFEval: the completion satisfies the one constraint named by the row's ground truth.

The ground truth is Ai2's JSON object: ``{"func_name": "validate_lowercase", "N": null, …}``.
Arguments given as null are ignored (Ai2's rows list every argument of every checker); a
non-null argument the checker does not take, a missing one, or an unknown ``func_name`` is a
malformed ground truth and raises :class:`ConstraintError` (counted as an error by the scorer).
"""

from __future__ import annotations

import functools
import inspect
import json

from tulu.rewards.ifeval_checks import FUNC_NAME_ALIASES, IF_FUNCTIONS, ConstraintError
from tulu.rewards.verifier import Verifier


def answer_text(completion: str) -> str:
    """The part of a completion a constraint applies to: after any ``</think>``, without
    ``<answer>`` tags, stripped (as open-instruct's ``remove_thinking_section``)."""
    text = completion.split("</think>")[-1]
    return text.replace("<answer>", "").replace("</answer>", "").strip()


@functools.lru_cache(maxsize=None)
def _parameters(func_name: str) -> tuple[set[str], set[str]]:
    params = list(inspect.signature(IF_FUNCTIONS[func_name]).parameters.values())[1:]
    return {p.name for p in params}, {p.name for p in params if p.default is p.empty}


def parse_constraint(ground_truth: str | dict) -> tuple[str, dict]:
    """``(func_name, arguments)`` of an IFEval ground truth, nulls dropped; checks the names."""
    if isinstance(ground_truth, dict):
        constraint = dict(ground_truth)
    else:
        try:
            constraint = json.loads(ground_truth)
        except (TypeError, ValueError) as exc:
            raise ConstraintError(f"IFEval ground truth is not JSON: {exc}") from None
    if not isinstance(constraint, dict) or "func_name" not in constraint:
        raise ConstraintError("IFEval ground truth must be a JSON object with a 'func_name'")
    raw = constraint.pop("func_name")
    func_name = FUNC_NAME_ALIASES.get(raw, raw) if isinstance(raw, str) else raw
    if not isinstance(func_name, str) or func_name not in IF_FUNCTIONS:
        raise ConstraintError(
            f"unknown IFEval func_name {func_name!r}; known: {', '.join(sorted(IF_FUNCTIONS))}"
        )
    args = {k: v for k, v in constraint.items() if v is not None}
    accepted, required = _parameters(func_name)
    unexpected, missing = set(args) - accepted, required - set(args)
    if unexpected or missing:
        raise ConstraintError(
            f"{func_name} takes arguments {sorted(accepted)}; "
            f"got unexpected {sorted(unexpected)}, missing {sorted(missing)}"
        )
    return func_name, args


class IFEvalVerifier(Verifier):
    """Runs the checker named by ``func_name`` on the completion's answer text."""

    name = "ifeval"

    def verify(self, completion: str, ground_truth: str) -> bool:
        func_name, args = parse_constraint(ground_truth)
        return bool(IF_FUNCTIONS[func_name](answer_text(completion), **args))

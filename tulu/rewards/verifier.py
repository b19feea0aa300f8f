"""`Verifier`: checks one completion against one ground truth; the registry of verifiers by name.

A verifier is named by the ``dataset`` column of Ai2's RLVR rows (``gsm8k``, ``MATH``, ``ifeval``);
names are case-insensitive. Verifiers are pure functions of their two strings: they never execute
or evaluate model output, and they may raise on malformed ground truth (the scorer turns that into
an unverified, counted error). They run inside the scorer's worker processes, which look them up
here by name, so a custom verifier must be registered by a module the workers import.
"""

from __future__ import annotations

import abc


class Verifier(abc.ABC):
    """Decides whether a completion is correct for a ground truth."""

    name: str = ""

    @abc.abstractmethod
    def verify(self, completion: str, ground_truth: str) -> bool:
        """True when ``completion`` is verified correct for ``ground_truth``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class UnknownVerifierError(KeyError):
    """A row names a verifier that is not registered."""

    def __init__(self, name: object, known: list[str]):
        self.verifier_name = name
        self.known = known
        super().__init__(f"unknown verifier {name!r}; known verifiers: {', '.join(known)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


_REGISTRY: dict[str, Verifier] = {}
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from tulu.rewards.gsm8k import GSM8KVerifier
    from tulu.rewards.hendrycks_math import MATHVerifier
    from tulu.rewards.ifeval import IFEvalVerifier

    for verifier in (GSM8KVerifier(), MATHVerifier(), IFEvalVerifier()):
        _REGISTRY.setdefault(verifier.name.lower(), verifier)


def register_verifier(verifier: Verifier, *, replace: bool = False) -> None:
    """Add ``verifier`` under ``verifier.name`` (case-insensitive)."""
    _load_builtins()
    key = verifier.name.strip().lower()
    if not key:
        raise ValueError(f"{verifier!r} has no name")
    if key in _REGISTRY and not replace:
        raise ValueError(f"a verifier named {key!r} is already registered; pass replace=True")
    _REGISTRY[key] = verifier


def get_verifier(name: str) -> Verifier:
    """The verifier registered as ``name`` (case-insensitive); raises `UnknownVerifierError`."""
    _load_builtins()
    key = name.strip().lower() if isinstance(name, str) else None
    if key is None or key not in _REGISTRY:
        raise UnknownVerifierError(name, known_verifiers())
    return _REGISTRY[key]


def known_verifiers() -> list[str]:
    """Registered verifier names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)

"""Routing one name Megatron calls a function by (in the module that calls it) to our own."""

from __future__ import annotations

import importlib

__all__ = ["NamePatch"]


class NamePatch:
    """``module.attribute`` replaced by ``replacement`` on :meth:`install` (idempotent), the
    function it replaced kept for the cases the replacement hands back. ``params``: the parameters
    the replacement relies on, in order (tests check them against the installed Megatron)."""

    def __init__(self, module: str, attribute: str, params: tuple[str, ...], replacement):
        self.target = (module, attribute, params)
        self.replacement = replacement
        self._original = None

    def original(self):
        """Megatron's own function (before or after :meth:`install`)."""
        if self._original is not None:
            return self._original
        module, name, _ = self.target
        return getattr(importlib.import_module(module), name)

    def install(self) -> None:
        module, name, _ = self.target
        owner = importlib.import_module(module)
        current = getattr(owner, name)
        if current is self.replacement:
            return
        self._original = current
        setattr(owner, name, self.replacement)

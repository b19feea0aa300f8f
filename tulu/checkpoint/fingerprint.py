"""Config fingerprints: which settings a checkpoint is only valid for.

A fingerprint is a flat ``{"dotted.key": value}`` dict of the config fields that change what the
saved tensors mean — model architecture, tokenizer/vocabulary, training stage — and *not* the
ones that may change between runs (parallel layout, batch size, learning rate, paths). Its hash
goes in the manifest; on resume, a different hash is an error that names each key that differs.
TP/PP are deliberately absent: Megatron's ``dist_checkpointing`` reshards on load.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from typing import Any, Iterable, Mapping

__all__ = [
    "DEFAULT_EXCLUDE", "DEFAULT_INCLUDE", "IncompatibleCheckpointError", "config_hash",
    "diff_fingerprints", "fingerprint", "flatten",
]

DEFAULT_INCLUDE = ("model", "tokenizer", "stage")
DEFAULT_EXCLUDE = (
    "*parallel*", "*.tp", "*.pp", "*.dp", "*.ep", "*.cp", "*micro_batch*", "*global_batch*",
    "*recompute*", "*path", "*dir",
)


class IncompatibleCheckpointError(RuntimeError):
    """The checkpoint was written under a config whose fingerprint differs from this run's."""

    def __init__(self, path: str, diffs: dict[str, tuple[Any, Any]]):
        self.path = path
        self.diffs = diffs
        lines = "\n".join(f"  {k}: checkpoint has {a!r}, this run has {b!r}"
                          for k, (a, b) in sorted(diffs.items()))
        super().__init__(
            f"checkpoint {path} was saved with an incompatible config; mismatched keys "
            f"{sorted(diffs)}:\n{lines}\nStart from a fresh checkpoint directory, point the run "
            f"at the right one, or convert the checkpoint explicitly."
        )


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; dataclasses and objects with ``to_dict`` too."""
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    elif hasattr(cfg, "__dataclass_fields__"):
        import dataclasses
        cfg = dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(cfg, tuple):
        cfg = list(cfg)
    return {prefix[:-1]: cfg}


def fingerprint(config: Any, include: Iterable[str] = DEFAULT_INCLUDE,
                exclude: Iterable[str] = DEFAULT_EXCLUDE) -> dict[str, Any]:
    """The flat fingerprint of ``config``: keys under ``include`` prefixes, minus ``exclude``
    glob patterns (matched against the dotted key)."""
    include, exclude = tuple(include), tuple(exclude)
    flat = flatten(config)
    return {
        k: v for k, v in sorted(flat.items())
        if any(k == p or k.startswith(p + ".") for p in include)
        and not any(fnmatch.fnmatchcase(k, pat) for pat in exclude)
    }


def config_hash(fp: Mapping[str, Any]) -> str:
    canonical = json.dumps(flatten(dict(fp)), sort_keys=True, separators=(",", ":"),
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def diff_fingerprints(saved: Mapping[str, Any], current: Mapping[str, Any]
                      ) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every key that differs; a key present on
    one side only shows ``"<absent>"`` on the other."""
    a, b = flatten(dict(saved)), flatten(dict(current))
    missing = "<absent>"
    return {k: (a.get(k, missing), b.get(k, missing))
            for k in sorted(a.keys() | b.keys()) if a.get(k, missing) != b.get(k, missing)}

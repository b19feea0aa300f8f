"""Shared body of the submitit entry points: `python jobs/<stage>.py [CONFIG] [tulu submit flags]`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tulu.cli import main  # noqa: E402


def submit(default_config: str, argv: list[str], mode: str | None = None) -> int:
    args = list(argv)
    if not args or args[0].startswith("-"):
        args.insert(0, str(Path(__file__).resolve().parents[1] / "configs" / default_config))
    if mode and "--mode" not in args:
        args += ["--mode", mode]
    return main(["submit", *args])

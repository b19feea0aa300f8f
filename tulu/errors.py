"""`CommandError`: a failure the user can fix (a missing file, a refused path, a Slurm command
that does not answer), as opposed to a bug. `tulu.cli.main` prints it as one line,
`tulu: <what>: <where>[; <hint>]`, and exits 2; `TULU_DEBUG=1` shows the traceback too.
"""

from __future__ import annotations

from pathlib import Path


class CommandError(Exception):
    """`what` went wrong, `where` names the path, key or job; `hint` says what to do instead."""

    def __init__(self, what: str, where: str | Path = "", hint: str = ""):
        self.what, self.where, self.hint = what, str(where), hint
        text = f"{what}: {where}" if str(where) else what
        super().__init__(f"{text}; {hint}" if hint else text)

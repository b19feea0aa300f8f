"""Every folder tulu deletes goes through `remove_tree`, so no path from a config or the command
line can delete the root, the home folder, the working folder, a git repository or this
checkout of tulu, nor a folder that holds one of them.

`refusal(path)` says why a folder must not be deleted (None: it may be); `remove_tree(path)`
deletes one after that check and raises `DeleteRefused`, naming the path, otherwise. Callers add
their own ownership rule on top (`tulu pipeline --fresh` also wants the pipeline's own
`pipeline.json`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tulu.errors import CommandError

__all__ = ["DeleteRefused", "protected_folders", "refusal", "remove_tree"]

_CHECKOUT = Path(__file__).resolve().parents[1]  # the folder holding the `tulu` package


class DeleteRefused(CommandError):
    def __init__(self, path: str | Path, reason: str):
        super().__init__("refusing to delete", path, reason)
        self.path, self.reason = Path(path), reason


def protected_folders() -> dict[Path, str]:
    """Folders never deleted, nor any folder that holds one: resolved path -> what it is."""
    found = {Path("/"): "the root folder"}
    home = os.environ.get("HOME") or str(Path.home())
    found[Path(home).resolve()] = "the home folder"
    try:
        found[Path.cwd().resolve()] = "the working folder"
    except OSError:  # the working folder itself was deleted
        pass
    if (_CHECKOUT / ".git").exists() or (_CHECKOUT / "pyproject.toml").exists():
        found[_CHECKOUT] = "the tulu repository"
    return found


def refusal(path: str | Path) -> str | None:
    """Why `path` must not be deleted, or None. Links are followed: a link to `/` is `/`."""
    target = Path(path).expanduser().resolve()
    for folder, what in protected_folders().items():
        if target == folder:
            return f"it is {what}"
        if folder.is_relative_to(target):
            return f"it holds {what} ({folder})"
    if (target / ".git").exists():
        return "it is a git repository"
    return None


def remove_tree(path: str | Path, *, ignore_errors: bool = False) -> None:
    """Delete the folder (or file) `path` if it exists and `refusal` allows it."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        return
    reason = refusal(path)
    if reason:
        raise DeleteRefused(path, reason)
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=ignore_errors)

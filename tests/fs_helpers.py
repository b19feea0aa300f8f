"""Small real file systems for storage-fault tests (we run as root: tmpfs mounts work)."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["mounted_tmpfs"]


@contextmanager
def mounted_tmpfs(path: Path, size: str, *, required: bool = False):
    """A tmpfs of ``size`` (e.g. "4m") at ``path``, lazily unmounted afterwards (kept with
    TULU_KEEP_TEST_FS=1, to look at it). Skips where mounting is refused, or fails if
    ``required`` (a tier that promises to run it)."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        (pytest.fail if required else pytest.skip)(f"cannot mount a tmpfs at {path}: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if not os.environ.get("TULU_KEEP_TEST_FS"):
            subprocess.run(["umount", "-l", str(path)], check=False)

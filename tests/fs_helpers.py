"""Small real file systems for storage-fault tests (we run as root: tmpfs mounts work)."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["mounted_loop_ext4", "mounted_tmpfs"]


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


@contextmanager
def mounted_loop_ext4(tmp_path: Path, size_mb: int = 64, *, required: bool = False):
    """An ext4 of ``size_mb`` on a loop device (``tmp_path/disk.img`` at ``tmp_path/loop_fs``);
    the ``eio`` fault makes its device fail. Skips (or fails if ``required``) where it cannot
    be made; detaches the loop device afterwards (kept with TULU_KEEP_TEST_FS=1)."""
    img, mnt = tmp_path / "disk.img", tmp_path / "loop_fs"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size_mb << 20)
    give_up = pytest.fail if required else pytest.skip
    for cmd in (["mkfs.ext4", "-q", "-F", str(img)], ["mount", "-o", "loop,errors=continue", str(img), str(mnt)]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except FileNotFoundError as e:
            give_up(f"{cmd[0]} is not installed: {e}")
        if r.returncode != 0:
            give_up(f"cannot make a loop-mounted ext4 ({' '.join(cmd[:2])}): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if not os.environ.get("TULU_KEEP_TEST_FS"):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
            for line in subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True).stdout.splitlines():
                subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)

"""Will the run folder hold the run? Checked by `tulu plan` (printed) and `tulu submit` (refused).

A run writes, at its peak, ``keep_last`` committed checkpoints plus the one being saved
(retention deletes the oldest only after the new one committed), plus its logs and monitor
records. `RunFolderSpace` compares that with the free space of the file system(s) holding the
checkpoint folder and the run folder; checkpoints already in the folder count as space the run
has (they are among the ``keep_last``). The checkpoint size is the plan's
(`tulu.plan.layout.checkpoint_bytes`: weights + Adam state); the trainer checks again before each save
with the real size of the last one (`tulu.checkpoint.manager`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tulu.config.job import ConfigError, JobConfig

__all__ = ["RunFolderSpace", "run_folder_space", "check_run_folder_space", "LOG_BYTES_PER_RANK"]

LOG_BYTES_PER_RANK = 5_000_000
"""Allowance per rank for its stdout/stderr logs and monitor records over a run (a tiny run
writes ~100 KB; a multi-day one with tracebacks and warnings a few MB)."""


def _fs(path: Path) -> tuple[int, int, int, str] | None:
    """(device, free bytes, total bytes, mount point) of the file system holding ``path``."""
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st, dev = os.statvfs(p), os.stat(p).st_dev
        mount = p
        while mount != mount.parent and os.stat(mount.parent).st_dev == dev:
            mount = mount.parent
    except OSError:
        return None
    return dev, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, str(mount)


def _existing_checkpoints(folder: Path) -> int:
    """Bytes of the step_N folders already there (committed or not)."""
    total = 0
    if not folder.is_dir():
        return 0
    for step in folder.glob("step_*"):
        for root, _, names in os.walk(step):
            for n in names:
                try:
                    total += os.lstat(os.path.join(root, n)).st_size
                except OSError:
                    pass
    return total


def _mb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


@dataclass(frozen=True, slots=True)
class RunFolderSpace:
    folder: Path            # the run folder
    checkpoint_dir: Path
    mount: str              # of the checkpoint folder's file system
    free_bytes: int         # on it, now
    total_bytes: int
    checkpoint_bytes: int   # one checkpoint
    keep_last: int
    existing_bytes: int     # checkpoints already in the folder
    log_bytes: int          # logs + monitor records (on the same file system, or 0)

    @property
    def needed_bytes(self) -> int:
        """Peak: keep_last + 1 checkpoints during a save, plus logs."""
        return self.checkpoint_bytes * (self.keep_last + 1) + self.log_bytes

    @property
    def available_bytes(self) -> int:
        return self.free_bytes + self.existing_bytes

    @property
    def fits(self) -> bool:
        return self.available_bytes >= self.needed_bytes

    def describe(self) -> str:
        lines = [f"checkpoint: ~{_mb(self.checkpoint_bytes)} each (weights + Adam state); keep_last "
                 f"{self.keep_last} + 1 during a save = {_mb(self.checkpoint_bytes * (self.keep_last + 1))}"
                 + (f", + logs ~{_mb(self.log_bytes)}" if self.log_bytes else ""),
                 f"run folder: {self.checkpoint_dir} on {self.mount}: {_mb(self.free_bytes)} free of "
                 f"{_mb(self.total_bytes)}"
                 + (f" (+ {_mb(self.existing_bytes)} in checkpoints already there)" if self.existing_bytes else "")]
        if not self.fits:
            lines.append(f"WARNING: the run folder's file system cannot hold this run: it needs "
                         f"{_mb(self.needed_bytes)}, {_mb(self.available_bytes)} available; a save will "
                         f"fail with ENOSPC. Free space, lower checkpoint.keep_last, or point run.dir / "
                         f"checkpoint.dir elsewhere (tulu submit refuses; checkpoint.check_free_space=false "
                         f"submits anyway)")
        return "\n".join(lines)


def run_folder_space(cfg: JobConfig, plan) -> RunFolderSpace | None:
    """The space check of a training job (None for rehearse/counter modes, or when the file
    system cannot be read)."""
    if cfg.mode != "train":
        return None
    from tulu.plan.layout import checkpoint_bytes

    ckpt_dir, run_dir = cfg.checkpoint_dir, cfg.run_dir
    ck, run = _fs(ckpt_dir), _fs(run_dir)
    if ck is None:
        return None
    logs = plan.world_size * LOG_BYTES_PER_RANK if run is not None and run[0] == ck[0] else 0
    return RunFolderSpace(folder=run_dir, checkpoint_dir=ckpt_dir, mount=ck[3], free_bytes=ck[1],
                          total_bytes=ck[2], checkpoint_bytes=checkpoint_bytes(cfg, plan.shape),
                          keep_last=cfg.checkpoint.keep_last,
                          existing_bytes=_existing_checkpoints(ckpt_dir), log_bytes=logs)


def check_run_folder_space(cfg: JobConfig, plan) -> RunFolderSpace | None:
    """`tulu submit`: refuse a run folder too small for the run, unless
    ``checkpoint.check_free_space`` is false."""
    space = run_folder_space(cfg, plan)
    if space is not None and not space.fits and cfg.checkpoint.check_free_space:
        raise ConfigError("checkpoint.check_free_space",
                          f"the file system of {space.checkpoint_dir} ({space.mount}) has "
                          f"{_mb(space.available_bytes)} for this run, which needs {_mb(space.needed_bytes)} "
                          f"({space.keep_last} + 1 checkpoints of ~{_mb(space.checkpoint_bytes)} during a "
                          f"save, + logs); free space, lower checkpoint.keep_last, move run.dir, or set "
                          f"checkpoint.check_free_space=false to submit anyway")
    return space

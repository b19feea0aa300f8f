"""Save, commit, verify, choose and load training checkpoints.

On disk, under ``root``::

    step_120/                 a committed checkpoint (it has a manifest)
      model/                  Megatron dist_checkpointing (every rank writes its shards)
      optimizer/              same, for an optimizer with sharded_state_dict (Megatron's)
      rank_00000.pt ...       per rank: RNG states, a plain torch optimizer's state_dict
      trainer_state.pt        rank 0: LR scheduler, data position, extra dicts (RL counters)
      manifest.json           written last: sizes + checksums of all the above; the commit
    step_130.tmp/             a save in progress or a crashed one: never loaded

A save writes everything into ``step_N.tmp/``, checksums and fsyncs every file (the ranks
share the reading), renames the folder to ``step_N/`` and only then writes the manifest with an
atomic rename. A resume takes the newest checkpoint whose manifest verifies (every size and
checksum); anything partial or corrupt is skipped with a warning that says why. Rank 0 decides
and broadcasts, so every rank loads the same step; verification reads are split across ranks.
Retention keeps the newest ``keep_last`` good checkpoints and deletes older ones only after a
new one has committed. All ranks share one filesystem (as on a Slurm cluster).

Free space: before writing, rank 0 compares the file system's free bytes with the size of the
newest committed checkpoint (an estimate from the model before the first) and every rank raises
`StorageFullError` (an ``OSError`` with errno ENOSPC, the path, the bytes needed and free) when
it does not fit: the run says so before a save, not midway through one. A save that still fails
for lack of space (another writer filled the disk) removes its ``step_N.tmp/`` and raises the
same error; after each commit a warning says when the next checkpoint will not fit.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from tulu.deletion import remove_tree

from . import collectives, rng, sharded
from .fingerprint import IncompatibleCheckpointError, config_hash, diff_fingerprints, flatten
from .manifest import (
    DEFAULT_ALGORITHM, Manifest, ManifestError, check_files, digest_files, fsync_dir,
    list_files, read_manifest, split_by_size, write_manifest,
)

__all__ = ["CheckpointManager", "LoadedCheckpoint", "StorageFullError", "current_layout", "resolve_checkpoint"]

log = logging.getLogger("tulu.checkpoint")

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.pt"


class StorageFullError(OSError):
    """A checkpoint does not fit (errno ENOSPC, or the file system's own errno when a write
    failed). Carries what the health monitor reports: ``filename``, ``needed_bytes``,
    ``free_bytes``, ``total_bytes``, ``mount``, ``what``."""

    def __init__(self, err: int, message: str, path: str, *, needed_bytes: int | None,
                 free_bytes: int | None, total_bytes: int | None, mount: str = "", what: str = ""):
        super().__init__(err, message, path)
        self.needed_bytes, self.free_bytes, self.total_bytes = needed_bytes, free_bytes, total_bytes
        self.mount, self.what = mount, what


def _space(path: Path) -> tuple[int, int, str] | None:
    """(free bytes, total bytes, mount point) of the file system holding ``path``."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
        mount, dev = p, os.stat(p).st_dev
        while mount != mount.parent and os.stat(mount.parent).st_dev == dev:
            mount = mount.parent
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, str(mount)


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
_ERRNO_TEXT = re.compile(r"\[Errno (%s)\]" % "|".join(str(n) for n in _STORAGE_ERRNOS))


def _probe(folder: Path) -> int | None:
    """Write and fsync 4 KiB in ``folder``: the storage errno it fails with, or None."""
    path = folder / f".tulu-write-probe.{os.getpid()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        return None
    except OSError as e:
        return e.errno if e.errno in _STORAGE_ERRNOS else None
    finally:
        try:
            path.unlink()
        except OSError:
            pass


def _fault_point(point: str, step: int) -> None:
    """Fault injection inside a save (`monitoring.faults`; rank = this world's rank, restart =
    ``$TULU_ATTEMPT``); nothing unless ``TULU_FAULT`` is set."""
    if not os.environ.get("TULU_FAULT"):
        return
    try:
        from monitoring import faults
    except ImportError:
        return
    faults.maybe_inject(point, step=step, rank=collectives.rank(),
                        restart=int(os.environ.get("TULU_ATTEMPT", "0") or 0))


def _rank_file(r: int) -> str:
    return f"rank_{r:05d}.pt"


def current_layout() -> dict[str, int]:
    """World size and Megatron's TP/PP/DP sizes (TP=PP=1, DP=world when Megatron is not set
    up). Megatron is not imported just to ask."""
    ws = collectives.world_size()
    layout = {"world_size": ws, "tp": 1, "pp": 1, "dp": ws}
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        layout.update(tp=ps.get_tensor_model_parallel_world_size(),
                      pp=ps.get_pipeline_model_parallel_world_size(),
                      dp=ps.get_data_parallel_world_size())
    return layout


@dataclasses.dataclass
class LoadedCheckpoint:
    """What :meth:`CheckpointManager.load` restored, and what it could not."""

    step: int
    path: Path
    manifest: Manifest
    data_state: Any = None
    extra_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_state: dict[str, Any] | None = None  # when the model was given as a template dict
    resharded: bool = False                    # saved under another TP/PP/DP layout
    not_restored: list[str] = dataclasses.field(default_factory=list)


class CheckpointManager:
    """Checkpoints of one run under ``root``.

    ``config_fingerprint`` is the flat dict of config fields a checkpoint is only valid for
    (see :func:`tulu.checkpoint.fingerprint.fingerprint`); a resume under a different one fails
    naming the keys. Every rank constructs it with the same arguments; ``save`` and ``load`` are
    collective when torch.distributed is initialised, and plain calls when it is not.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 3,
                 config_fingerprint: Mapping[str, Any] | None = None, *,
                 layout: Mapping[str, int] | None = None,
                 algorithm: str = DEFAULT_ALGORITHM, hash_threads: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (got {keep_last}): the newest verified "
                             "checkpoint is never deleted")
        self.root = Path(root)
        self.keep_last = keep_last
        # JSON round trip: what is compared on resume is exactly what the manifest stores.
        self.config_fingerprint = json.loads(json.dumps(flatten(dict(config_fingerprint or {})),
                                                        default=str))
        self.config_hash = config_hash(self.config_fingerprint)
        self._layout = dict(layout) if layout else None
        self.algorithm = algorithm
        self.hash_threads = hash_threads
        self.rejected: dict[int, list[str]] = {}  # step -> problems found by load/verify
        self.last_save_stats: dict[str, float] = {}
        self.last_load_stats: dict[str, float] = {}
        # Bytes one checkpoint takes: the newest committed one's size, else this (the caller's
        # estimate, e.g. the rank plan's), else an estimate from the model's parameters.
        self.expected_bytes: int | None = None
        self.space_margin = 1.05   # a save needs this x the expected bytes free

    @property
    def layout(self) -> dict[str, int]:
        return dict(self._layout) if self._layout else current_layout()

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step}"

    # ---------------------------------------------------------------- save
    def save(self, step: int, model: sharded.ModelLike | None = None, *,
             optimizer: Any = None, lr_scheduler: Any = None, data_state: Any = None,
             extra_state: Mapping[str, Any] | None = None) -> Path:
        """Write, verify and commit checkpoint ``step``; returns its folder. Collective.

        ``model``: a Megatron module, a sharded state dict (or a callable returning one), a
        plain module or tensor dict. ``optimizer``: Megatron's (saved sharded, reshardable) or a
        ``torch.optim`` one (saved per rank: restorable under the same layout only).
        ``lr_scheduler``: anything with ``state_dict``. ``data_state``/``extra_state``: the
        caller's opaque, picklable state (data position; RL counters; ...), taken from rank 0.
        """
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        t0 = time.perf_counter()
        r = collectives.rank()
        final = self.path_for(step)
        tmp = final.with_name(final.name + ".tmp")
        refusal = collectives.broadcast_object(self._no_room(step, tmp, model) if r == 0 else None)
        if refusal is not None:   # every rank raises the same error: none waits in a collective
            raise StorageFullError(**refusal)
        _fault_point("checkpoint_write", step)
        try:
            return self._save(step, model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                              data_state=data_state, extra_state=extra_state, t0=t0)
        except BaseException as e:   # torch's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            err = self._failed_save(e, step, tmp)
            if err is e:
                raise
            raise err from e

    def _save(self, step: int, model, *, optimizer, lr_scheduler, data_state, extra_state,
              t0: float) -> Path:
        r = collectives.rank()
        final = self.path_for(step)
        tmp = final.with_name(final.name + ".tmp")
        contents: dict[str, Any] = {}
        if r == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):
                log.warning("removing %s: a save that never committed", stale)
                remove_tree(stale)
            tmp.mkdir()
            for sub in (["model"] if model is not None else []) + (
                    ["optimizer"] if sharded.has_sharded_state(optimizer) else []):
                (tmp / sub).mkdir()
        collectives.barrier()

        if model is not None:
            sharded.save_model(model, tmp / "model")
            contents["model"] = "dist_checkpointing"
        per_rank: dict[str, Any] = {"rng": rng.capture_rng_state(), "layout": self.layout}
        if optimizer is not None:
            if sharded.has_sharded_state(optimizer):
                if model is None:
                    raise ValueError("a Megatron optimizer is saved against the model's "
                                     "sharded state dict: pass model= too")
                sharded.save_optimizer(optimizer, model, tmp / "optimizer")
                contents["optimizer"] = "dist_checkpointing"
            else:
                per_rank["optimizer"] = optimizer.state_dict()
                contents["optimizer"] = "per_rank"
        torch.save(per_rank, tmp / _rank_file(r))
        if r == 0:
            torch.save({
                "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
                "data_state": data_state,
                "extra_state": dict(extra_state or {}),
            }, tmp / TRAINER_STATE)
        contents.update(lr_scheduler=lr_scheduler is not None, data_state=data_state is not None,
                        extra_state=sorted(extra_state or {}))
        collectives.barrier()
        t_written = time.perf_counter()

        # Checksum + fsync every file; the ranks split the reading.
        sizes = collectives.broadcast_object(
            {n: os.stat(tmp / n).st_size for n in list_files(tmp)} if r == 0 else None)
        share = split_by_size(sizes, collectives.world_size())[r]
        mine = digest_files(tmp, share, self.algorithm, fsync=True, threads=self.hash_threads)
        gathered = collectives.all_gather_object(mine)
        t_hashed = time.perf_counter()

        if r == 0:
            files = {k: v for part in gathered for k, v in part.items()}
            for d in sorted({(tmp / n).parent for n in files}, reverse=True):
                fsync_dir(d)
            self._make_room(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
            manifest = Manifest(step=step, config_hash=self.config_hash,
                                config_fingerprint=self.config_fingerprint, layout=self.layout,
                                files=files, contents=contents, algorithm=self.algorithm)
            write_manifest(final, manifest)  # the commit
            self._apply_retention(newest=step)
        collectives.barrier()
        t_end = time.perf_counter()
        total = sum(sizes.values())
        self.last_save_stats = {
            "bytes": total, "write_s": t_written - t0, "hash_s": t_hashed - t_written,
            "total_s": t_end - t0,
        }
        log.info("checkpoint step %d committed at %s (%.1f MB in %.2f s, hashing %.2f s)",
                 step, final, total / 1e6, t_end - t0, t_hashed - t_written)
        if r == 0:
            space = _space(self.root)
            if space is not None and space[0] < total * self.space_margin:
                log.warning("only %s free on %s (%s): the next checkpoint (~%s) will not fit; "
                            "free space before the next save", _mb(space[0]), space[2], self.root,
                            _mb(total))
        return final

    # ---------------------------------------------------------------- free space
    def needed_bytes(self, model: Any = None) -> int | None:
        """Bytes the next checkpoint will take: the newest committed one's size, else
        ``expected_bytes``, else weights + Adam moments (3x the parameters) over TP x PP."""
        for _, path in self.committed():
            try:
                return read_manifest(path).total_bytes
            except (ManifestError, OSError):
                continue
        if self.expected_bytes:
            return int(self.expected_bytes)
        params = getattr(model, "parameters", None)
        if not callable(params):
            return None
        local = sum(p.numel() * p.element_size() for p in params())
        layout = self.layout
        return int(3 * local * layout.get("tp", 1) * layout.get("pp", 1))

    def _no_room(self, step: int, tmp: Path, model: Any) -> dict | None:
        """Rank 0: the `StorageFullError` arguments when checkpoint ``step`` will not fit."""
        needed = self.needed_bytes(model)
        space = _space(self.root)
        if not needed or space is None:
            return None
        free, total, mount = space
        if free >= needed * self.space_margin:
            return None
        what = f"checkpoint step {step}"
        return dict(err=errno.ENOSPC, path=str(tmp), needed_bytes=int(needed * self.space_margin),
                    free_bytes=free, total_bytes=total, mount=mount, what=what,
                    message=f"{what} needs ~{_mb(needed)} but {mount} has {_mb(free)} free "
                            f"(not saved, nothing written); free space, then resubmit: the run "
                            f"resumes from its last committed checkpoint")

    def _failed_save(self, e: BaseException, step: int, tmp: Path) -> BaseException:
        """A save failed midway. When the file system is the cause: remove its ``step_N.tmp``
        (no zero-byte leftovers on a full disk) and say so as a `StorageFullError`."""
        if isinstance(e, StorageFullError):
            remove_tree(tmp, ignore_errors=True)
            return e
        space = _space(self.root)
        err = next((x.errno for x in _chain(e) if isinstance(x, OSError)
                    and x.errno in _STORAGE_ERRNOS), None)
        if err is None:   # dist_checkpointing's writer threads report theirs as text
            m = _ERRNO_TEXT.search(" ".join(str(x) for x in _chain(e)))
            err = int(m.group(1)) if m else None
        needed = self.needed_bytes()
        if err is None and space is not None and needed and space[0] < needed:
            err = errno.ENOSPC   # torch.save's writer reports a full disk without an errno
        if err is None:
            err = _probe(self.root)   # a failing device shows itself as other errors too
        if err is None:
            return e   # not the disk: leave the folder as a crash would (the next save clears it)
        remove_tree(tmp, ignore_errors=True)
        free, total, mount = space if space is not None else (None, None, "")
        what = f"checkpoint step {step}"
        return StorageFullError(err, f"{what} failed while writing: {os.strerror(err)} "
                                     f"({_mb(free)} free on {mount or '?'}, ~{_mb(needed)} needed; "
                                     f"{type(e).__name__}: {str(e)[:200]})", str(tmp),
                                needed_bytes=needed, free_bytes=free, total_bytes=total,
                                mount=mount, what=what)

    def _make_room(self, final: Path) -> None:
        """Clear ``final`` for the rename: a same-step leftover from an earlier attempt."""
        if not final.exists():
            return
        if (final / "manifest.json").exists():
            log.warning("step %s is being saved again: replacing the committed %s",
                        final.name, final)
        aside = final.with_name(final.name + ".replaced.tmp")
        os.rename(final, aside)
        remove_tree(aside)

    # ---------------------------------------------------------------- find / verify
    def committed(self) -> list[tuple[int, Path]]:
        """Folders that have a manifest, newest step first (not yet verified)."""
        return [(s, p) for s, p in self._step_dirs() if (p / "manifest.json").exists()]

    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if p.is_dir() and (m := _STEP_DIR.match(p.name))]
        return sorted(found, reverse=True)

    def verify(self, path: str | os.PathLike, *, checksums: bool = True) -> list[str]:
        """Problems with the checkpoint at ``path`` (empty list: it verifies). Local, no
        collectives; reads every file unless ``checksums=False`` (sizes only)."""
        path = Path(path)
        try:
            manifest = self._read_checked_manifest(path)
        except ManifestError as e:
            return [str(e)]
        return check_files(path, manifest, checksums=checksums, threads=self.hash_threads)

    def _read_checked_manifest(self, path: Path) -> Manifest:
        manifest = read_manifest(path)
        m = _STEP_DIR.match(path.name)
        if m and int(m.group(1)) != manifest.step:
            raise ManifestError(f"manifest says step {manifest.step}, folder is {path.name}")
        return manifest

    def latest_verified(self) -> tuple[int, Path] | None:
        """The newest checkpoint that verifies, checked by this process alone."""
        for step, path in self._candidates():
            problems = self.verify(path)
            if not problems:
                return step, path
            self._reject(step, path, problems)
        return None

    def _candidates(self) -> list[tuple[int, Path]]:
        out = []
        for step, path in self._step_dirs():
            if (path / "manifest.json").exists():
                out.append((step, path))
            else:
                log.warning("skipping checkpoint %s: no manifest (save never committed)", path)
        return out

    def _reject(self, step: int, path: Path, problems: list[str]) -> None:
        self.rejected[step] = problems
        if collectives.rank() == 0:
            log.warning("skipping checkpoint %s: %s", path, "; ".join(problems))

    def _choose(self, step: int | None) -> tuple[int, Path, Manifest] | None:
        """Collective: the checkpoint every rank will load; rank 0 lists, all ranks verify a
        share of the files, rank 0's listing and the gathered verdict decide."""
        r = collectives.rank()
        if r == 0:
            cands: list[tuple[int, Path]] | str = self._candidates()
            if step is not None:
                cands = [(s, p) for s, p in cands if s == step] or \
                    f"no committed checkpoint for step {step} in {self.root}"
        cands = collectives.broadcast_object(cands if r == 0 else None)
        if isinstance(cands, str):  # raised on every rank, so none waits in a collective
            raise FileNotFoundError(cands)
        for s, path in cands:
            manifest_or_error: Manifest | str
            if r == 0:
                try:
                    manifest_or_error = self._read_checked_manifest(path)
                except ManifestError as e:
                    manifest_or_error = str(e)
            manifest_or_error = collectives.broadcast_object(manifest_or_error if r == 0 else None)
            if isinstance(manifest_or_error, str):
                self._reject(s, path, [manifest_or_error])
                continue
            manifest = manifest_or_error
            share = split_by_size({n: e.size for n, e in manifest.files.items()},
                                  collectives.world_size())[r]
            mine = check_files(path, manifest, share, threads=self.hash_threads)
            problems = [p for part in collectives.all_gather_object(mine) for p in part]
            if not problems:
                return s, path, manifest
            self._reject(s, path, problems)
            if step is not None:
                raise RuntimeError(f"checkpoint {path} does not verify: {'; '.join(problems)}")
        return None

    # ---------------------------------------------------------------- load
    def load(self, model: sharded.ModelLike | None = None, *, optimizer: Any = None,
             lr_scheduler: Any = None, step: int | None = None, restore_rng: bool = True
             ) -> LoadedCheckpoint | None:
        """Restore the newest verified checkpoint (or exactly ``step``). Collective.

        Returns None when there is nothing to resume from. Raises
        :class:`IncompatibleCheckpointError` when the checkpoint's config fingerprint differs.
        A model or Megatron optimizer loads under any TP/PP (resharding); per-rank state (RNG,
        a plain torch optimizer) only under the layout it was saved with; otherwise it is left
        as is and listed in ``not_restored`` with a warning.
        """
        if sharded.has_sharded_state(optimizer) and model is None:
            raise ValueError("a Megatron optimizer loads against the model's sharded state "
                             "dict: pass model= too")
        t0 = time.perf_counter()
        chosen = self._choose(step)
        if chosen is None:
            if collectives.rank() == 0:
                log.info("no verified checkpoint under %s: starting fresh", self.root)
            return None
        s, path, manifest = chosen
        t_verified = time.perf_counter()
        if manifest.config_hash != self.config_hash:
            diffs = diff_fingerprints(manifest.config_fingerprint, self.config_fingerprint)
            raise IncompatibleCheckpointError(str(path), diffs)

        layout = self.layout
        out = LoadedCheckpoint(step=s, path=path, manifest=manifest,
                               resharded=manifest.layout != layout)
        if model is not None:
            if "model" not in manifest.contents:
                raise ValueError(f"checkpoint {path} holds no model state")
            out.model_state = sharded.load_model(model, path / "model")
        trainer = torch.load(path / TRAINER_STATE, weights_only=False)  # verified, ours
        out.data_state, out.extra_state = trainer["data_state"], trainer["extra_state"]
        if lr_scheduler is not None and trainer["lr_scheduler"] is not None:
            lr_scheduler.load_state_dict(trainer["lr_scheduler"])

        per_rank = None
        if out.resharded:
            why = f"saved under {manifest.layout}, this run is {layout}"
            out.not_restored += ["rng"] if restore_rng else []
        else:
            per_rank = torch.load(path / _rank_file(collectives.rank()), weights_only=False)
        if optimizer is not None:
            kind = manifest.contents.get("optimizer")
            if kind == "dist_checkpointing":
                sharded.load_optimizer(optimizer, model, path / "optimizer")
            elif kind == "per_rank" and per_rank is not None:
                optimizer.load_state_dict(per_rank["optimizer"])
            else:
                out.not_restored.append("optimizer")
        if restore_rng and per_rank is not None:
            out.not_restored += rng.restore_rng_state(per_rank["rng"])
        if out.not_restored and collectives.rank() == 0:
            log.warning("checkpoint %s: not restored: %s (%s)", path, out.not_restored,
                        why if out.resharded else "not in this checkpoint or not on this host")
        self.last_load_stats = {"bytes": manifest.total_bytes,
                                "verify_s": t_verified - t0,
                                "total_s": time.perf_counter() - t0}
        return out

    # ---------------------------------------------------------------- retention
    def _apply_retention(self, newest: int) -> None:
        """Keep the newest ``keep_last`` checkpoints that pass a size check (the one just
        committed among them); delete older ones and older uncommitted leftovers. Checkpoints
        found corrupt earlier do not count toward ``keep_last``."""
        kept: list[int] = []
        for s, p in self.committed():
            if len(kept) < self.keep_last and s not in self.rejected and not self.verify(
                    p, checksums=False):
                kept.append(s)
        if newest not in kept:  # cannot happen after a good commit; never delete blindly
            log.error("retention skipped: the new checkpoint %d is not among the kept", newest)
            return
        for s, p in self._step_dirs():
            if s not in kept and s < newest:
                log.info("retention: deleting %s (keep_last=%d)", p, self.keep_last)
                remove_tree(p, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Manifest]:
    """``path`` is a ``step_N`` folder (must verify) or a run's checkpoint root (newest that
    verifies)."""
    path = Path(path)
    if (path / "manifest.json").exists():
        mgr = CheckpointManager(path.parent)
        problems = mgr.verify(path)
        if problems:
            raise RuntimeError(f"checkpoint {path} does not verify: {'; '.join(problems)}")
    else:
        mgr = CheckpointManager(path)
        found = mgr.latest_verified()
        if found is None:
            raise FileNotFoundError(f"no verified checkpoint under {path}")
        path = found[1]
    return path, read_manifest(path)

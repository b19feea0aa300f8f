"""Checkpoints that survive crashes: commit by manifest, verify before load, reshard TP/PP.

    from tulu.checkpoint import CheckpointManager, fingerprint

    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=3,
                             config_fingerprint=fingerprint(cfg))
    resumed = ckpt.load(model, optimizer=opt, lr_scheduler=sched)   # None: fresh start
    start = resumed.step + 1 if resumed else 0
    ...
    ckpt.save(step, model, optimizer=opt, lr_scheduler=sched,
              data_state=loader.state_dict(), extra_state={"rl": counters})
"""

from .fingerprint import IncompatibleCheckpointError, config_hash, diff_fingerprints, fingerprint
from .manager import CheckpointManager, LoadedCheckpoint, current_layout
from .manifest import Manifest, ManifestError
from .rng import capture_rng_state, restore_rng_state

__all__ = [
    "CheckpointManager", "IncompatibleCheckpointError", "LoadedCheckpoint", "Manifest",
    "ManifestError", "capture_rng_state", "config_hash", "current_layout", "diff_fingerprints",
    "fingerprint", "restore_rng_state",
]

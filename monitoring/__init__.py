"""tulu-hpc health monitor: rank-side progress records, the monitor sidecar, diagnosis,
the requeue policy and fault injection. It never imports `tulu` (training code); `tulu`
imports it. Importing the package is free: each module is imported where it is used.

Rank side      `monitoring.progress.ProgressTracker`, `monitoring.faults.maybe_inject`
Batch script   `monitoring.recovery.setup_lines` -> `python -m monitoring.sidecar` (background)
               and `python -m monitoring.on_exit` (EXIT trap)
Reports        `monitoring.diagnosis.load_last_report` (for `tulu status`)
Storage        `monitoring.storage`: ENOSPC/EDQUOT/EROFS/EIO named (path, errno, bytes); the
               monitor's own writes fall back to ``MonitorConfig.fallback_dir`` and never raise
Drill          `python -m monitoring.drill` (a tiny job that exercises all of the above)
"""

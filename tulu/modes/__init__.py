"""What a task runs inside the allocation, by the config's ``mode``: ``train`` (the stage),
``rehearse`` (form every group, one collective each, membership report) and ``counter`` (a tiny
resumable loop the requeue tests use). `tulu.launch.task` picks one; the user-facing submitit
scripts are the repository's top-level ``jobs/``."""

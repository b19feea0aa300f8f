"""A fire drill: a tiny gloo "training" job that exercises the monitor end to end.

    RANK=0 WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 \\
    TULU_FAULT="kind=sigstop,rank=3,step=2" \\
        python -m monitoring.drill --monitor-dir D --steps 6

Each step walks the phases an RLVR step has — ``generate`` (sleep), ``train`` (an all-reduce),
``checkpoint`` every ``--checkpoint-every`` steps (rank 0 "saves", everyone waits in a
barrier), ``weight_sync`` (a broadcast) — reporting them through `ProgressTracker` and calling
`maybe_inject` at each point. The multi-process tests, the benchmark, and the Slurm
integration tests (``srun python -m monitoring.drill``) use it; it needs torch, the monitor
itself does not.

Rank and world come from ``RANK``/``WORLD_SIZE`` or, under srun, ``SLURM_PROCID``/
``SLURM_NTASKS``; the restart count from ``TULU_ATTEMPT`` (exported by the setup lines).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

from monitoring.faults import maybe_inject
from monitoring.progress import ProgressTracker
from monitoring.record import monitor_session


def _seconds(spec: str, i: int) -> float:
    values = [float(x) for x in spec.split(",") if x]
    return values[min(i, len(values) - 1)] if values else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monitoring.drill")
    ap.add_argument("--monitor-dir", default=os.environ.get("TULU_MONITOR_DIR"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--generate-seconds", type=float, default=0.05)
    ap.add_argument("--checkpoint-every", type=int, default=2)
    ap.add_argument("--checkpoint-seconds", default="0.1",
                    help="comma list: duration of the 1st, 2nd, ... checkpoint (last repeats)")
    ap.add_argument("--pg-timeout", type=float, default=120.0)
    ap.add_argument("--start-step", type=int, default=0)
    ap.add_argument("--backend", choices=("gloo", "files"), default="gloo",
                    help="files: torch-free barriers through the monitor dir (fast start-up)")
    args = ap.parse_args(argv)
    if not args.monitor_dir:
        ap.error("--monitor-dir (or TULU_MONITOR_DIR) is required")

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    attempt = int(os.environ.get("TULU_ATTEMPT", "0") or 0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0"))
                                             % 20000))
    tracker = ProgressTracker(args.monitor_dir, rank, world, role="drill", attempt=attempt,
                              session=monitor_session() or "")

    with tracker.phase("setup"):
        maybe_inject("setup", 0, rank, attempt)
        comm = _Gloo(rank, world, args.pg_timeout) if args.backend == "gloo" else \
            _Files(args.monitor_dir, rank, world, attempt)
    n_ckpt = 0
    for step in range(args.start_step, args.steps):
        with tracker.phase("generate", step):
            maybe_inject("generate", step, rank, attempt)
            time.sleep(args.generate_seconds)
        with tracker.phase("train", step):
            maybe_inject("train", step, rank, attempt)
            comm.all_reduce(f"train{step}")
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            with tracker.phase("checkpoint", step):
                maybe_inject("checkpoint", step, rank, attempt)
                if rank == 0:
                    time.sleep(_seconds(args.checkpoint_seconds, n_ckpt))
                comm.barrier(f"ckpt{step}")
            n_ckpt += 1
        with tracker.phase("weight_sync", step):
            maybe_inject("weight_sync", step, rank, attempt)
            comm.broadcast(f"sync{step}")
        tracker.step_done(step)
        print(f"rank {rank} step {step} done", flush=True)
    comm.close()
    tracker.exit(0)
    return 0


class _Gloo:
    def __init__(self, rank: int, world: int, timeout_s: float) -> None:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        self.torch, self.dist, self.rank = torch, dist, rank

    def all_reduce(self, name: str) -> None:
        self.dist.all_reduce(self.torch.ones(4) * (self.rank + 1))

    def barrier(self, name: str) -> None:
        self.dist.barrier()

    def broadcast(self, name: str) -> None:
        self.dist.broadcast(self.torch.arange(4.0), src=0)

    def close(self) -> None:
        self.dist.destroy_process_group()


class _Files:
    """Barriers through marker files: every collective is a barrier that blocks until all
    ranks arrived - enough to make a missing rank hang the others."""

    def __init__(self, monitor_dir: str, rank: int, world: int, attempt: int) -> None:
        from pathlib import Path

        self.dir = Path(monitor_dir) / "drill_barriers" / str(attempt)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = rank, world

    def barrier(self, name: str) -> None:
        (self.dir / f"{name}.{self.rank}").touch()
        while sum(1 for _ in self.dir.glob(f"{name}.*")) < self.world:
            time.sleep(0.01)

    all_reduce = broadcast = barrier

    def close(self) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())

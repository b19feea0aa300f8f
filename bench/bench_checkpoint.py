"""Checkpoint save/load throughput: tulu.checkpoint (Megatron dist_checkpointing + fsync +
checksummed manifest, verified on load) vs plain torch.save/torch.load of the same state.

One process (a throw-away 1-rank gloo group for dist_checkpointing). Prints one JSON line per
figure. Files are read back from the page cache right after writing, so load figures are
memory-speed reads, not cold-disk reads; save figures include fsync for tulu only (torch.save
does not fsync), so the gap is partly durability, on purpose.

    .venv/bin/python bench/bench_checkpoint.py            # 512 MB state
    .venv/bin/python bench/bench_checkpoint.py --quick    # 16 MB, for CI
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _emit(figure: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"bench": "checkpoint", "figure": figure, "value": round(value, 2),
                      "unit": unit, **extra}), flush=True)


def _state(total_mb: float) -> dict[str, torch.Tensor]:
    """A model-shaped state: a few big matrices plus many small vectors, float32."""
    n_big = 8
    big = int(total_mb * 0.98 * (1 << 20) / 4 / n_big)
    cols = 1024
    rows = max(1, big // cols)
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(rows, cols, generator=g) for i in range(n_big)}
    sd.update({f"layers.{i}.norm": torch.randn(cols, generator=g) for i in range(64)})
    return sd


def _nbytes(sd) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 MB, one repeat (CI)")
    p.add_argument("--mb", type=float, default=512.0, help="state size in MB")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = p.parse_args(argv)
    mb, repeat = (16.0, 1) if args.quick else (args.mb, args.repeat)

    from tulu.models import megatron_cpu  # dist_checkpointing's CUDA calls -> CPU

    megatron_cpu.apply()
    from tulu.checkpoint import CheckpointManager
    from tulu.checkpoint.manifest import file_digest

    sd = _state(mb)
    nbytes = _nbytes(sd)
    size_mb = nbytes / 1e6
    work = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
    common = {"mb": round(size_mb, 1), "threads": torch.get_num_threads()}
    try:
        # --- plain torch.save / torch.load
        plain = work / "plain.pt"
        t = _best(lambda: torch.save(sd, plain), repeat)
        _emit("torch_save_MBps", size_mb / t, "MB/s", **common)
        t = _best(lambda: torch.load(plain, weights_only=True), repeat)
        _emit("torch_load_MBps", size_mb / t, "MB/s", **common)

        # --- checksum speed alone (page cache)
        for algo in ("sha256", "blake2b"):
            t = _best(lambda: file_digest(plain, algo), repeat)
            _emit(f"checksum_{algo}_MBps", size_mb / t, "MB/s", **common)
        plain.unlink()

        # --- tulu.checkpoint
        mgr = CheckpointManager(work / "ckpt", keep_last=1, config_fingerprint={"bench": 1})
        stats = []
        step = [0]

        def save():
            step[0] += 1
            mgr.save(step[0], sd)
            stats.append(dict(mgr.last_save_stats))

        t = _best(save, repeat)
        _emit("tulu_save_MBps", size_mb / t, "MB/s", includes="write+fsync+checksum+commit",
              **common)
        _emit("tulu_first_save_s", stats[0]["total_s"], "s",
              note="first save pays dist_checkpointing's one-time writer-process start", **common)
        s = min(stats, key=lambda x: x["total_s"])
        _emit("tulu_save_write_MBps", size_mb / s["write_s"], "MB/s", **common)
        _emit("tulu_save_checksum_fsync_MBps", size_mb / s["hash_s"], "MB/s", **common)

        template = {k: torch.empty_like(v) for k, v in sd.items()}
        loads = []

        def load():
            got = mgr.load(template)
            loads.append(dict(mgr.last_load_stats))
            assert torch.equal(got.model_state["layers.0.weight"], sd["layers.0.weight"])

        t = _best(load, repeat)
        _emit("tulu_load_MBps", size_mb / t, "MB/s", includes="verify+load", **common)
        v = min(loads, key=lambda x: x["total_s"])
        _emit("tulu_load_verify_MBps", size_mb / v["verify_s"], "MB/s", **common)
        _emit("tulu_load_after_verify_MBps", size_mb / (v["total_s"] - v["verify_s"]), "MB/s",
              **common)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

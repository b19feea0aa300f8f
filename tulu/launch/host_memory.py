"""glibc's allocator, set for the CPU-only tasks: tensors are freed and allocated again every step.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold
(128 KiB at start, raised to the size of the largest block freed since, up to 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed, and it gives the top of the heap back to the
kernel once more than twice that threshold is free there. A training step on CPU allocates and
frees the same activation-sized blocks (0.1-1 MiB for the tiny models) thousands of times, so
part of them are zero pages faulted in again on every use: 580-1,500 page faults per learner step
of the arithmetic RL bench (0.9M parameters), 24 with the settings below. Through the whole RL job
(learner and engine; `bench/bench_grpo_vs_trl.py`'s arithmetic task, ours only, alternating with
``TULU_HOST_MALLOC=default`` on the same 2-core machine): 447 / 442 -> 453 / 455 samples/s.

:func:`tune_for_cpu_job` makes every block up to 32 MiB (glibc's largest mmap threshold) come from
the heap and keeps up to 256 MiB of freed heap before trimming, the same idea as running PyTorch on
CPU under jemalloc or tcmalloc, without a preloaded library. The cost is memory: a task's resident
size may stay up to that much above what it holds. GPU tasks are left as they are, as is any task
where ``TULU_HOST_MALLOC=default`` or glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["SETTINGS", "tune_for_cpu_job"]

# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

#: mallopt settings (name, parameter, value in bytes) for a CPU-only task.
SETTINGS = (
    ("mmap_threshold", _M_MMAP_THRESHOLD, 32 << 20),
    ("trim_threshold", _M_TRIM_THRESHOLD, 256 << 20),
    ("top_pad", _M_TOP_PAD, 16 << 20),
)


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl and others have no such symbol
        return libc
    except (OSError, AttributeError):
        return None


def tune_for_cpu_job(on_gpu: bool) -> str:
    """Apply :data:`SETTINGS` in this process unless it uses a GPU; says what was done (for the log)."""
    if on_gpu:
        return "malloc: default (GPU task)"
    if os.environ.get("TULU_HOST_MALLOC", "") == "default":
        return "malloc: default (TULU_HOST_MALLOC=default)"
    libc = _glibc()
    if libc is None:
        return "malloc: default (not glibc)"
    refused = [name for name, param, value in SETTINGS if libc.mallopt(param, value) != 1]
    if refused:
        return f"malloc: glibc refused {', '.join(refused)}"
    return "malloc: " + ", ".join(f"{name} {value >> 20} MiB" for name, _, value in SETTINGS)

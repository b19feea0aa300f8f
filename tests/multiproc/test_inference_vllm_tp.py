"""vLLM with tensor parallelism 2 under ``external_launcher``: two processes launched
torchrun-style (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT of the inference world) each
build the engine and produce exactly the transformers engine's greedy tokens, before and after a
weight update that each rank receives as full HF tensors.
"""

from __future__ import annotations

import importlib.util
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


def _tp2_rank(rank, world_size, model_dir):  # noqa: ARG001
    from tulu.inference import SamplingSettings, make_engine

    greedy = SamplingSettings(temperature=0, max_new_tokens=12)
    engine = make_engine("vllm", model_dir, tp=2, max_model_len=128, dtype="float32", seed=0)
    before = [c.token_ids for c in engine.generate(PROMPTS, 1, greedy)]
    engine.update_weights(_perturbed(model_dir))
    after = [c.token_ids for c in engine.generate(PROMPTS, 1, greedy)]
    engine.close()
    return before, after


def test_tp2_external_launcher_matches_transformers_before_and_after_a_weight_update(
        tmp_path):
    from tulu.inference import SamplingSettings, make_engine
    from tulu.inference.tiny import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "model")
    results = run_distributed(_tp2_rank, 2, str(model_dir), timeout=400, init_process_group=False)

    greedy = SamplingSettings(temperature=0, max_new_tokens=12)
    hf = make_engine("transformers", model_dir)
    expected_before = [c.token_ids for c in hf.generate(PROMPTS, 1, greedy)]
    hf.update_weights(_perturbed(model_dir))
    expected_after = [c.token_ids for c in hf.generate(PROMPTS, 1, greedy)]

    assert expected_before != expected_after
    for rank, (before, after) in enumerate(results):
        assert before == expected_before, f"rank {rank} before the update"
        assert after == expected_after, f"rank {rank} after the update"

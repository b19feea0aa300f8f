"""The training group's settings reach Megatron as the config says, on CPU as on a GPU:
``grad_dtype`` picks the DDP gradient dtype, ``distributed_optimizer`` the optimizer,
``sequence_parallel`` the TransformerConfig; and the pipeline split Megatron builds is the
plan's (``tulu.plan.layout.layers_per_stage``), uneven 405B splits included."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

pytest.importorskip("megatron.core")

from tulu.config.job import TrainingGroupConfig  # noqa: E402
from tulu.models.llama import pipeline_split_settings  # noqa: E402
from tulu.plan.layout import layers_per_stage  # noqa: E402
from tulu.train.model import _transformer_overrides, ddp_config  # noqa: E402


@pytest.mark.parametrize("grad_dtype, in_fp32", [("bf16", False), ("fp32", True)])
def test_ddp_reduces_gradients_in_the_configured_grad_dtype(grad_dtype, in_fp32):
    assert ddp_config(TrainingGroupConfig(grad_dtype=grad_dtype)).grad_reduce_in_fp32 is in_fp32


@pytest.mark.parametrize("on", [True, False])
def test_distributed_optimizer_follows_the_config_on_every_device(on):
    assert ddp_config(TrainingGroupConfig(distributed_optimizer=on)).use_distributed_optimizer is on


def test_sequence_parallel_reaches_megatron_with_tp_above_one_on_every_device():
    assert _transformer_overrides(TrainingGroupConfig(tp=2, sequence_parallel=True))["sequence_parallel"] is True
    assert "sequence_parallel" not in _transformer_overrides(TrainingGroupConfig(tp=1, sequence_parallel=True))
    assert "sequence_parallel" not in _transformer_overrides(TrainingGroupConfig(tp=2))


# 405B (126 layers) at the presets' PP10 and PP8, 70B (80) at PP6, 8B (32) at PP4, the miniatures.
SPLITS = [(126, 10), (126, 8), (80, 6), (32, 4), (5, 2), (8, 3), (3, 2)]


@pytest.mark.parametrize("num_layers, pp", SPLITS, ids=[f"{n}_layers_pp{p}" for n, p in SPLITS])
def test_megatron_builds_the_plans_layers_per_stage_at_the_plans_offsets(num_layers, pp):
    import torch
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                               **pipeline_split_settings(num_layers, pp))
    plan = layers_per_stage(num_layers, pp)
    assert tuple(get_num_layers_to_build(config, pp_rank=r) for r in range(pp)) == plan
    offsets = [sum(plan[:r]) for r in range(pp)]
    assert [get_transformer_layer_offset(config, pp_rank=r) for r in range(pp)] == offsets


def test_an_even_split_leaves_megatron_on_its_default():
    assert pipeline_split_settings(32, 4) == {}
    assert pipeline_split_settings(126, 10) == {"num_layers_in_first_pipeline_stage": 11,
                                                "num_layers_in_last_pipeline_stage": 11}

"""Llama presets carry the real Llama 3.1 shapes; the tiny test config and the helpers that turn
HF configs into Megatron settings (rope, vocabulary padding) say what they promise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tulu.models.presets import LLAMA_PRESETS  # noqa: E402

KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads")


def _params(p: dict) -> int:
    h, v, f, n = p["hidden_size"], p["vocab_size"], p["intermediate_size"], p["num_hidden_layers"]
    kv = p["num_key_value_heads"] * (h // p["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return n * per_layer + 2 * v * h + h


@pytest.mark.parametrize("name,billions", [("llama3.1-8b", 8.03), ("llama3.1-70b", 70.55),
                                           ("llama3.1-405b", 405.85)])
def test_llama31_presets_have_the_published_parameter_counts(name, billions):
    preset = LLAMA_PRESETS[name]
    assert all(k in preset for k in KEYS)
    assert _params(preset) / 1e9 == pytest.approx(billions, abs=0.01)


def test_llama31_405b_preset_has_the_design_shapes():
    p = LLAMA_PRESETS["llama3.1-405b"]
    assert (p["num_hidden_layers"], p["hidden_size"], p["intermediate_size"],
            p["num_attention_heads"], p["num_key_value_heads"], p["vocab_size"]) == (
        126, 16384, 53248, 128, 8, 128256)


def test_preset_becomes_a_llama_config_and_unknown_names_are_listed():
    pytest.importorskip("transformers")
    from tulu.models.llama import llama_config_from_preset, rope_settings

    cfg = llama_config_from_preset("llama3.1-8b")
    assert cfg.num_hidden_layers == 32 and cfg.num_key_value_heads == 8
    theta, scaling = rope_settings(cfg)
    assert theta == 500000.0
    assert scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192.0}
    with pytest.raises(KeyError, match="llama3.1-405b"):
        llama_config_from_preset("llama3.1-7b")


def test_tiny_llama_config_is_small_gqa_and_untied():
    pytest.importorskip("transformers")
    from tulu.models.llama import rope_settings, tiny_llama_config

    cfg = tiny_llama_config()
    assert cfg.vocab_size <= 512 and cfg.hidden_size == 64
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert not cfg.tie_word_embeddings
    assert rope_settings(cfg)[1] is None
    assert rope_settings(tiny_llama_config(rope_scaling=True))[1]["factor"] == 8.0


def test_vocab_is_padded_to_a_multiple_of_tensor_parallelism_only_when_needed():
    from tulu.models.llama import padded_vocab_size

    assert padded_vocab_size(128256, 8) == 128256
    assert padded_vocab_size(255, 2) == 256
    assert padded_vocab_size(255, 1) == 255
    assert padded_vocab_size(50257, 4, multiple=128) == 50688

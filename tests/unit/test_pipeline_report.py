"""The pipeline's report: the accuracy table (stages in order, tasks as columns, n in the header,
each stage's change from the one before), the three report files, and the one-figure PNG drawn
from stage metrics files, where a stage that did not run or logged nothing is left out."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tulu.pipeline.plot import plot_pipeline
from tulu.pipeline.report import accuracy_table, markdown_table, write_report


def _result(acc: dict[str, tuple[int, float]], example: str = "The answer is 4.") -> dict:
    n = sum(k for k, _ in acc.values())
    return {"n": n, "accuracy": sum(k * a for k, a in acc.values()) / n,
            "per_task": {t: {"n": k, "accuracy": a} for t, (k, a) in acc.items()},
            "examples": {t: example for t in acc}}


RESULTS = {
    "base": _result({"gsm8k": (64, 0.0), "ifeval": (32, 0.03125)}),
    "sft": _result({"gsm8k": (64, 0.421875), "ifeval": (32, 0.15625)}),
    "dpo": _result({"gsm8k": (64, 0.5), "ifeval": (32, 0.0625)}),
    "rlvr": _result({"gsm8k": (64, 0.609375), "ifeval": (32, 0.25)}),
}


def test_table_has_a_row_per_stage_in_order_and_n_in_the_header():
    assert accuracy_table(RESULTS) == (
        "stage  gsm8k (n=64)  ifeval (n=32)  all (n=96)  delta all\n"
        "base          0.000          0.031       0.010          -\n"
        "sft           0.422          0.156       0.333     +0.323\n"
        "dpo           0.500          0.062       0.354     +0.021\n"
        "rlvr          0.609          0.250       0.490     +0.135\n"
    )


def test_delta_is_against_the_previous_stage_and_can_be_negative():
    table = accuracy_table({"sft": _result({"math": (10, 0.5)}), "dpo": _result({"math": (10, 0.3)})})
    assert table.splitlines()[2].split() == ["dpo", "0.300", "0.300", "-0.200"]


def test_a_task_missing_from_a_stage_shows_a_dash_and_unequal_n_are_all_named():
    table = accuracy_table({"sft": _result({"gsm8k": (8, 0.5), "math": (4, 0.25)}),
                            "rlvr": _result({"gsm8k": (6, 1.0)}),
                            "dpo": None})  # a stage that failed to evaluate is left out
    header, sft, rlvr = table.splitlines()
    assert header.split() == ["stage", "gsm8k", "(n=6/8)", "math", "(n=4)", "all", "(n=6/12)", "delta", "all"]
    assert rlvr.split() == ["rlvr", "1.000", "-", "1.000", "+0.583"]


def test_write_report_writes_json_text_and_markdown(tmp_path):
    png = tmp_path / "pipeline.png"
    png.write_bytes(b"")
    paths = write_report(tmp_path / "report", RESULTS, curves_png=png)
    assert set(paths) == {"json", "txt", "md"}
    assert json.loads(paths["json"].read_text()) == RESULTS
    assert paths["txt"].read_text() == accuracy_table(RESULTS)
    md = paths["md"].read_text()
    assert markdown_table(RESULTS) in md
    assert "| rlvr | 0.609 | 0.250 | 0.490 | +0.135 |" in md
    assert "](../pipeline.png)" in md  # relative, so the report folder can be moved with its run
    assert "**sft / gsm8k**" in md and "The answer is 4." in md
    assert not list((tmp_path / "report").glob("*.tmp"))


def _metrics(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def stage_dirs(tmp_path) -> dict[str, Path]:
    sft = _metrics(tmp_path / "sft", [{"kind": "eval", "step": 0, "loss": 6.2}]
                   + [{"kind": "train", "step": s, "loss": 6.0 / s, "lr": 1e-3} for s in range(1, 21)]
                   + [{"kind": "eval", "step": 20, "loss": 0.5}])
    dpo = _metrics(tmp_path / "dpo", [{"kind": "train", "step": s, "loss": 0.69 - 0.01 * s,
                                       "accuracy": 0.5 + 0.02 * s, "margin": 0.05 * s} for s in range(1, 11)])
    rlvr = _metrics(tmp_path / "rlvr", [{"kind": "train", "step": s, "reward_mean": 1.0 + s / 10,
                                         "verified_gsm8k": 0.1 + s / 100, "verified_all": 0.1 + s / 100}
                                        for s in range(1, 31)])
    return {"sft": sft, "dpo": dpo, "rlvr": rlvr}


def test_plot_draws_every_stage_and_the_accuracy_bars_in_a_png(stage_dirs, tmp_path):
    out = plot_pipeline(stage_dirs, RESULTS, tmp_path / "fig" / "pipeline.png")
    assert out == tmp_path / "fig" / "pipeline.png"
    assert _png_size(out) == (1300, 840)  # four panels, two by two, 650 x 420 pixels each
    import matplotlib.image

    pixels = matplotlib.image.imread(str(out))
    assert pixels.std() > 0.05  # something is drawn, not a blank canvas


def test_plot_skips_stages_that_did_not_run_or_logged_nothing(stage_dirs, tmp_path):
    full = _png_size(plot_pipeline(stage_dirs, RESULTS, tmp_path / "full.png"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    partial = plot_pipeline({"sft": stage_dirs["sft"], "dpo": tmp_path / "never-ran",
                             "rlvr": tmp_path / "empty"}, {}, tmp_path / "partial.png")
    assert full == (1300, 840) and _png_size(partial) == (650, 420)  # the SFT panel alone
    nothing = plot_pipeline({}, {}, tmp_path / "nothing.png")
    assert _png_size(nothing)[0] > 0


def test_rlvr_curves_are_trailing_means_that_start_with_the_first_values():
    from tulu.pipeline.plot import _smooth

    assert _smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert _smooth([0.5, 0.0], 1) == [0.5, 0.0]


def test_untrained_model_has_the_trained_models_shape_and_tokenizer_and_fresh_weights(tmp_path):
    """The evaluation's first row: a seeded random model of the SFT model's shape, with its tokenizer."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from tulu.data.tokenizer import save_tiny_tokenizer
    from tulu.models.llama import tiny_llama_config
    from tulu.pipeline.steps import untrained_model

    trained = tmp_path / "sft-hf"
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=512, hidden_size=64, intermediate_size=176,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=16, max_position_embeddings=128))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "trained": far from any initialisation
    model.save_pretrained(trained)
    save_tiny_tokenizer(trained)

    a = untrained_model(trained, tmp_path / "a", seed=1)
    b = untrained_model(trained, tmp_path / "b", seed=1)
    c = untrained_model(trained, tmp_path / "c", seed=2)
    shape = {k: v for k, v in json.loads((trained / "config.json").read_text()).items() if k != "dtype"}
    assert {k: v for k, v in json.loads((a / "config.json").read_text()).items() if k != "dtype"} == shape
    assert (a / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    wa, wb, wc, wt = (load_file(str(d / "model.safetensors")) for d in (a, b, c, trained))
    assert wa.keys() == wt.keys()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(wa[name], wb[name]) and not torch.equal(wa[name], wc[name])
    assert wa[name].std() < 0.1 and wt[name].mean() > 0.9  # an initialisation, not the trained weights

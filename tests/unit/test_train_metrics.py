"""`tulu.train.metrics.MetricsLog`: each record goes to metrics.jsonl and, as one event, to
TensorBoard with the tags and steps `SummaryWriter.add_scalar` would give; a resumed run cuts
the file back to its checkpoint's step."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from tulu.train.metrics import MetricsLog, read_metrics  # noqa: E402


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_numeric_value_reaches_tensorboard_under_kind_slash_key_at_its_step(tmp_path):
    lines: list[str] = []
    m = MetricsLog(tmp_path, log=lines.append)
    m.write("train", 1, {"loss": 2.5, "grad_norm": 0.25, "tokens": 7, "stop": False, "note": "x"})
    m.write("train", 2, {"loss": 1.5, "grad_norm": 0.5, "tokens": 9, "stop": True, "note": "y"})
    m.write("eval", 2, {"accuracy": 0.75})
    m.close()
    got = _scalars(tmp_path / "tensorboard")
    assert got == {"train/loss": [(1, 2.5), (2, 1.5)], "train/grad_norm": [(1, 0.25), (2, 0.5)],
                   "train/tokens": [(1, 7.0), (2, 9.0)], "train/stop": [(1, 0.0), (2, 1.0)],
                   "eval/accuracy": [(2, 0.75)]}
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2]
    assert read_metrics(tmp_path, "eval") == [{"kind": "eval", "step": 2, "accuracy": 0.75}]
    assert lines[0] == "train step 1: loss 2.5 grad_norm 0.25 tokens 7 stop False note x"


def test_the_same_as_add_scalar_would_write(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    values = {"loss": 0.123456789, "lr": 3e-4, "n": 3}
    ref = SummaryWriter(str(tmp_path / "ref"))
    for k, v in values.items():
        ref.add_scalar(f"train/{k}", v, 5)
    ref.close()
    m = MetricsLog(tmp_path / "run", log=lambda s: None)
    m.write("train", 5, values)
    m.close()
    assert _scalars(tmp_path / "run" / "tensorboard") == _scalars(tmp_path / "ref")


def test_a_resumed_run_cuts_the_records_after_its_checkpoint(tmp_path):
    m = MetricsLog(tmp_path, log=lambda s: None, tensorboard=False)
    for step in range(1, 6):
        m.write("train", step, {"loss": float(step)})
    m.truncate_after(3)
    m.write("train", 4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]

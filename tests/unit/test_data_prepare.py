"""Data named by `data.train` is tokenized once, by a preparation step before the training job
(`tulu.modes.prepare`, `tulu.train.data.prepare_stage_data`); the training ranks then read the
prepared rows and nobody waits at a barrier on a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tulu.config.job import load_config
from tulu.data.synthetic import synthetic_rows
from tulu.train.data import load_stage_data, prepare_stage_data, prepared_folder, prepared_summary

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _cfg(tmp_path: Path, stage: str = "sft", *sets: str):
    kind = {"sft": "sft", "dpo": "preference"}[stage]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / f"{kind}.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(kind, 64, 3)))
    return load_config(CONFIGS / f"tiny-cpu-{stage}.yaml",
                       [f"run.dir={tmp_path}/run", f"data.train={data}", "data.synthetic=null",
                        "cluster.executor=local", "cluster.nodes=1", *sets])


def _no_barrier():
    raise AssertionError("a prepared stage must not wait at the barrier")


def _rows(ds) -> list:
    return [dict(r) for r in ds.dataset]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_prepared_rows_equal_tokenizing_in_the_job_and_need_no_barrier(tmp_path, stage):
    cfg = _cfg(tmp_path, stage)
    fresh = load_stage_data(cfg, "tiny", is_leader=True, barrier=lambda: None, eval_size=0)
    folder = prepared_folder(cfg, "tiny")
    assert prepared_summary(folder) is None
    summary = prepare_stage_data(cfg, "tiny", num_proc=2)
    assert summary["rows"] == len(fresh.train) and (folder / "ready.json").exists()
    for leader in (True, False):
        got = load_stage_data(cfg, "tiny", is_leader=leader, barrier=_no_barrier, eval_size=0)
        assert _rows(got.train) == _rows(fresh.train)
        assert got.train.kind == fresh.train.kind and got.train.pad_token_id == fresh.train.pad_token_id


def test_a_second_preparation_reuses_the_folder_and_another_key_gets_its_own(tmp_path):
    cfg = _cfg(tmp_path)
    first = prepare_stage_data(cfg, "tiny")
    folder = prepared_folder(cfg, "tiny")
    stamp = (folder / "ready.json").stat().st_mtime_ns
    assert prepare_stage_data(cfg, "tiny") == first
    assert (folder / "ready.json").stat().st_mtime_ns == stamp
    longer = _cfg(tmp_path, "sft", "sft.max_seq_len=96")
    assert prepared_folder(longer, "tiny") != folder
    assert prepared_folder(cfg, "some/other-tokenizer") != folder


def test_a_half_written_folder_is_not_read(tmp_path):
    cfg = _cfg(tmp_path)
    folder = prepared_folder(cfg, "tiny")
    (folder / "train").mkdir(parents=True)  # a crash before ready.json
    assert prepared_summary(folder) is None
    got = load_stage_data(cfg, "tiny", is_leader=True, barrier=lambda: None, eval_size=0)
    assert len(got.train) > 0


def test_submit_prepares_first_and_plan_says_so(tmp_path, monkeypatch):
    from tulu.launch import executor
    from tulu.modes import prepare
    from tulu.plan.layout import build_plan

    cfg = _cfg(tmp_path)
    assert prepare.preparation(cfg)[0] == "needed"
    assert "gets tokenized by a preparation job before training" in prepare.describe(cfg)
    submitted = []
    monkeypatch.setattr(executor, "submit", lambda c, p, path=None, after_ok=None: submitted.append(after_ok) or "job")
    job, prep = prepare.submit_job(cfg, build_plan(cfg))
    assert (job, prep, submitted) == ("job", "here", [None])
    assert prepare.preparation(cfg)[0] == "ready" and "is prepared in" in prepare.describe(cfg)
    # Slurm: a one-task job first, and the training job waits for it (afterok)
    calls = []
    slurm_cfg = _cfg(tmp_path / "b")
    slurm_cfg.cluster.executor = "slurm"

    class Job:
        job_id = "4242"

    monkeypatch.setattr(executor, "submit_call", lambda fn, *a, **kw: calls.append((fn, kw["after_ok"])) or Job())
    job, prep = prepare.submit_job(slurm_cfg, build_plan(slurm_cfg))
    assert prep == "4242" and calls == [(prepare.prepare, None)] and submitted[-1] == "4242"


def test_synthetic_data_and_rlvr_have_nothing_to_prepare():
    from tulu.modes import prepare

    for name in ("tiny-cpu-sft", "tiny-cpu-rlvr", "tulu3-405b-rlvr"):
        assert prepare.preparation(load_config(CONFIGS / f"{name}.yaml")) is None

"""Checkpoint promises in one process: commit by manifest, refuse corrupt or partial saves,
fall back to the previous good one, reject an incompatible config, keep the last K, and
restore RNG exactly."""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tulu.checkpoint import (  # noqa: E402
    CheckpointManager, IncompatibleCheckpointError, fingerprint,
)
from tulu.checkpoint import manager as manager_mod  # noqa: E402
from tulu.checkpoint.manifest import MANIFEST_NAME, read_manifest, split_by_size  # noqa: E402

FP = {"model.hidden_size": 8, "model.num_layers": 2, "tokenizer.vocab_size": 32,
      "stage": "sft"}


@pytest.fixture(autouse=True, scope="module")
def _megatron_on_cpu():
    """dist_checkpointing calls torch.cuda.synchronize/current_device; redirect them on CPU."""
    from tulu.models import megatron_cpu

    megatron_cpu.apply()


class Tiny(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _trained(seed: int):
    model = Tiny(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        model(torch.randn(3, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                   b.state_dict().values()))


def _save_steps(root: Path, steps, keep_last=5) -> tuple[CheckpointManager, dict]:
    mgr = CheckpointManager(root, keep_last=keep_last, config_fingerprint=FP)
    models = {}
    for s in steps:
        models[s] = Tiny(seed=s)
        mgr.save(s, models[s], data_state={"sample": s * 10})
    return mgr, models


def _biggest_model_file(ckpt: Path) -> Path:
    return max((p for p in (ckpt / "model").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def test_save_commits_with_manifest_and_round_trips_everything(tmp_path):
    model, opt, sched = _trained(0)
    mgr = CheckpointManager(tmp_path, keep_last=2, config_fingerprint=FP)
    path = mgr.save(7, model, optimizer=opt, lr_scheduler=sched,
                    data_state={"epoch": 1, "index": 42}, extra_state={"rl": {"episodes": 9}})

    assert path == tmp_path / "step_7" and not (tmp_path / "step_7.tmp").exists()
    manifest = read_manifest(path)
    assert manifest.step == 7 and manifest.config_hash == mgr.config_hash
    assert manifest.layout == {"world_size": 1, "tp": 1, "pp": 1, "dp": 1}
    assert set(manifest.files) >= {"trainer_state.pt", "rank_00000.pt", "model/.metadata"}
    for name, entry in manifest.files.items():
        assert (path / name).stat().st_size == entry.size
    assert mgr.verify(path) == []
    assert mgr.latest_verified() == (7, path)

    model2, opt2, sched2 = Tiny(seed=99), None, None
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    loaded = mgr.load(model2, optimizer=opt2, lr_scheduler=sched2)
    assert loaded.step == 7 and not loaded.resharded and loaded.not_restored == []
    assert _same_weights(model, model2)
    assert loaded.data_state == {"epoch": 1, "index": 42}
    assert loaded.extra_state == {"rl": {"episodes": 9}}
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(s1[k], s2[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_saves_collect_write_results_in_process_without_a_manager(tmp_path):
    """No spawn Manager (a fresh interpreter per process, 3.5 s on the first save): Megatron's
    writer gets an in-process queue. Fails by name if megatron-core moves the global."""
    import multiprocessing
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    assert hasattr(fa, "_results_queue"), "megatron-core moved filesystem_async._results_queue"
    children_before = set(multiprocessing.active_children())
    CheckpointManager(tmp_path, config_fingerprint=FP).save(1, Tiny(seed=1))
    assert type(fa._results_queue) is queue.Queue
    assert set(multiprocessing.active_children()) <= children_before  # no Manager process left


def test_load_returns_none_when_there_is_no_checkpoint(tmp_path):
    assert CheckpointManager(tmp_path / "nothing", config_fingerprint=FP).load(Tiny(0)) is None


def test_truncated_file_is_refused_and_previous_checkpoint_is_loaded(tmp_path, caplog):
    mgr, models = _save_steps(tmp_path, [1, 2])
    victim = _biggest_model_file(tmp_path / "step_2")
    victim.write_bytes(victim.read_bytes()[:-5])

    assert any("truncated" in p for p in mgr.verify(tmp_path / "step_2"))
    model = Tiny(seed=123)
    with caplog.at_level(logging.WARNING, logger="tulu.checkpoint"):
        loaded = CheckpointManager(tmp_path, config_fingerprint=FP).load(model)
    assert loaded.step == 1 and loaded.data_state == {"sample": 10}
    assert _same_weights(model, models[1])
    assert "step_2" in caplog.text and "truncated" in caplog.text


def test_flipped_byte_is_refused_and_previous_checkpoint_is_loaded(tmp_path, caplog):
    mgr, models = _save_steps(tmp_path, [1, 2])
    victim = _biggest_model_file(tmp_path / "step_2")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    problems = mgr.verify(tmp_path / "step_2")
    assert len(problems) == 1 and "checksum mismatch" in problems[0]
    model = Tiny(seed=123)
    with caplog.at_level(logging.WARNING, logger="tulu.checkpoint"):
        loaded = CheckpointManager(tmp_path, config_fingerprint=FP).load(model)
    assert loaded.step == 1 and _same_weights(model, models[1])
    assert "checksum mismatch" in caplog.text and victim.name in caplog.text


def test_edited_manifest_is_refused(tmp_path):
    mgr, _ = _save_steps(tmp_path, [1, 2])
    mpath = tmp_path / "step_2" / MANIFEST_NAME
    body = json.loads(mpath.read_text())
    body["files"]["trainer_state.pt"]["size"] += 1  # digest no longer matches the body
    mpath.write_text(json.dumps(body))
    assert "own digest" in mgr.verify(tmp_path / "step_2")[0]
    assert mgr.latest_verified()[0] == 1


def test_missing_file_is_refused(tmp_path):
    mgr, _ = _save_steps(tmp_path, [1])
    (tmp_path / "step_1" / "rank_00000.pt").unlink()
    assert mgr.verify(tmp_path / "step_1") == ["rank_00000.pt: missing"]
    assert mgr.latest_verified() is None


def test_tmp_leftover_and_uncommitted_folder_are_ignored(tmp_path, caplog):
    mgr, models = _save_steps(tmp_path, [1])
    (tmp_path / "step_5.tmp" / "model").mkdir(parents=True)
    (tmp_path / "step_5.tmp" / "trainer_state.pt").write_bytes(b"half")
    (tmp_path / "step_3").mkdir()  # renamed but the manifest never written
    (tmp_path / "step_3" / "trainer_state.pt").write_bytes(b"whole, but not committed")

    model = Tiny(seed=50)
    with caplog.at_level(logging.WARNING, logger="tulu.checkpoint"):
        loaded = mgr.load(model)
    assert loaded.step == 1 and _same_weights(model, models[1])
    assert "step_3: no manifest" in caplog.text

    mgr.save(4, Tiny(seed=4))  # the next save clears both leftovers
    assert not (tmp_path / "step_5.tmp").exists() and not (tmp_path / "step_3").exists()


@pytest.mark.parametrize("crash_point", ["after_model_files", "before_manifest"])
def test_crash_mid_save_leaves_previous_checkpoint_as_latest(tmp_path, monkeypatch,
                                                              crash_point):
    mgr, models = _save_steps(tmp_path, [1], keep_last=1)

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    # RNG capture runs after dist_checkpointing wrote the model shards into step_2.tmp;
    # write_manifest runs after the folder was renamed to step_2.
    target = "rng" if crash_point == "after_model_files" else "write_manifest"
    if target == "rng":
        monkeypatch.setattr(manager_mod.rng, "capture_rng_state", boom)
    else:
        monkeypatch.setattr(manager_mod, "write_manifest", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mgr.save(2, Tiny(seed=2))
    monkeypatch.undo()

    leftover = tmp_path / ("step_2.tmp" if target == "rng" else "step_2")
    assert leftover.is_dir() and any(leftover.rglob("*.distcp"))
    fresh = CheckpointManager(tmp_path, keep_last=1, config_fingerprint=FP)
    assert fresh.latest_verified() == (1, tmp_path / "step_1")
    model = Tiny(seed=77)
    assert fresh.load(model).step == 1 and _same_weights(model, models[1])


def test_incompatible_config_fails_naming_the_mismatched_keys(tmp_path):
    _save_steps(tmp_path, [1])
    changed = dict(FP, **{"model.hidden_size": 16, "tokenizer.vocab_size": 64})
    with pytest.raises(IncompatibleCheckpointError) as err:
        CheckpointManager(tmp_path, config_fingerprint=changed).load(Tiny(0))
    msg = str(err.value)
    assert "model.hidden_size" in msg and "tokenizer.vocab_size" in msg
    assert "model.num_layers" not in msg and "stage" not in msg.split("mismatched keys")[1][:60]
    assert err.value.diffs == {"model.hidden_size": (8, 16), "tokenizer.vocab_size": (32, 64)}


def test_fingerprint_keeps_architecture_and_drops_parallel_layout_and_hyperparameters():
    cfg = {"model": {"hidden_size": 8, "tensor_model_parallel_size": 2,
                     "pipeline_model_parallel_size": 2, "rope": {"theta": 1e4}},
           "tokenizer": {"name": "llama3", "vocab_size": 128256},
           "stage": "dpo", "train": {"lr": 1e-6, "micro_batch_size": 2}}
    assert fingerprint(cfg) == {"model.hidden_size": 8, "model.rope.theta": 1e4,
                                "stage": "dpo", "tokenizer.name": "llama3",
                                "tokenizer.vocab_size": 128256}
    a = CheckpointManager("/nonexistent", config_fingerprint=fingerprint(cfg))
    cfg["model"]["tensor_model_parallel_size"] = 8
    cfg["train"]["lr"] = 3e-7
    assert CheckpointManager("/nonexistent", config_fingerprint=fingerprint(cfg)).config_hash \
        == a.config_hash


def test_keep_last_k_deletes_older_checkpoints_only_after_a_new_one_commits(tmp_path,
                                                                            monkeypatch):
    mgr, _ = _save_steps(tmp_path, [10, 20, 30, 40], keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_30", "step_40"]

    monkeypatch.setattr(manager_mod, "write_manifest",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        mgr.save(50, Tiny(seed=5))
    monkeypatch.undo()
    assert (tmp_path / "step_30").is_dir() and (tmp_path / "step_40").is_dir()


def test_keep_last_does_not_count_a_checkpoint_found_corrupt(tmp_path):
    mgr, _ = _save_steps(tmp_path, [1, 2], keep_last=5)
    victim = _biggest_model_file(tmp_path / "step_2")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    mgr = CheckpointManager(tmp_path, keep_last=1, config_fingerprint=FP)
    assert mgr.load(Tiny(0)).step == 1          # step 2 found corrupt, resumed from 1
    mgr.save(3, Tiny(seed=3))
    assert mgr.latest_verified()[0] == 3
    mgr.save(4, Tiny(seed=4))
    assert not (tmp_path / "step_1").exists() and not (tmp_path / "step_3").exists()
    assert mgr.latest_verified()[0] == 4


def test_saving_the_same_step_again_replaces_it(tmp_path):
    mgr, _ = _save_steps(tmp_path, [1])
    new = Tiny(seed=1000)
    mgr.save(1, new)
    model = Tiny(seed=0)
    assert mgr.load(model).step == 1 and _same_weights(model, new)


def test_rng_state_restored_reproduces_the_same_random_draws(tmp_path):
    mgr = CheckpointManager(tmp_path, config_fingerprint=FP)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)  # advance past the seeds
    mgr.save(1, Tiny(seed=0))

    def draws():
        return random.random(), np.random.rand(3).tolist(), torch.rand(4).tolist(), \
            torch.randint(0, 1000, (3,)).tolist()

    expected = draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert draws() != expected
    loaded = mgr.load(Tiny(seed=0))
    assert loaded.not_restored == []
    assert draws() == expected


def test_model_as_a_template_state_dict_returns_the_loaded_tensors(tmp_path):
    sd = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2)}
    mgr = CheckpointManager(tmp_path, config_fingerprint=FP)
    mgr.save(1, lambda: sd, extra_state={"note": "callable model"})
    got = mgr.load({"w": torch.zeros(3, 4), "b": torch.zeros(2)})
    assert torch.equal(got.model_state["w"], sd["w"]) and torch.equal(got.model_state["b"],
                                                                     sd["b"])


def test_split_by_size_balances_bytes_and_is_deterministic():
    sizes = {"a": 100, "b": 90, "c": 60, "d": 40, "e": 10}
    parts = split_by_size(sizes, 2)
    assert parts == split_by_size(dict(reversed(sizes.items())), 2)
    assert sorted(sum(sizes[n] for n in p) for p in parts) == [150, 150]
    assert split_by_size({"x": 1}, 3) == [["x"], [], []]


def test_resolve_checkpoint_takes_a_step_folder_or_the_newest_verified_under_a_root(tmp_path):
    from tulu.checkpoint.manager import resolve_checkpoint

    _save_steps(tmp_path / "ckpt", [1, 2])
    path, manifest = resolve_checkpoint(tmp_path / "ckpt")
    assert path.name == "step_2" and manifest.step == 2
    path, manifest = resolve_checkpoint(tmp_path / "ckpt" / "step_1")
    assert path.name == "step_1" and manifest.step == 1
    (tmp_path / "ckpt" / "step_2" / "trainer_state.pt").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="does not verify"):
        resolve_checkpoint(tmp_path / "ckpt" / "step_2")
    assert resolve_checkpoint(tmp_path / "ckpt")[0].name == "step_1"  # newest that verifies
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "empty")


def test_loading_an_explicit_step_that_is_missing_or_corrupt_fails_loudly(tmp_path):
    mgr, _ = _save_steps(tmp_path, [1, 2])
    with pytest.raises(FileNotFoundError, match="step 3"):
        mgr.load(Tiny(0), step=3)
    (tmp_path / "step_1" / "trainer_state.pt").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="does not verify"):
        mgr.load(Tiny(0), step=1)
    assert mgr.load(Tiny(0), step=2).step == 2

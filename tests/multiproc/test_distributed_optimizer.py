"""Megatron's distributed optimizer, which every flagship preset turns on, runs on CPU (gloo's
reduce-scatter and all-gather) and resumes: a run saved after k steps and continued by a freshly
built optimizer has Adam's moments and step exactly as saved and repeats the uninterrupted run's
losses bit for bit; the checkpoint ("fully_reshardable") loads into another data-parallel size
with the same state; through the real training job (an uneven PP2 x DP2 miniature with
``grad_dtype: bf16``) an interrupted and resumed run repeats every loss of the unkilled one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tests.dist_helpers import run_distributed  # noqa: E402
from tests.multiproc.test_train import losses, tiny_config, train  # noqa: E402

pytestmark = pytest.mark.multiproc

VOCAB, SEQ, MICRO_BATCH, SAVE_AT, CONTINUE = 64, 16, 2, 3, 3


def _build(distributed: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from tulu.models.convert import hf_state_dict_to_megatron
    from tulu.models.llama import build_gpt_model, tiny_llama_config
    from tulu.train.model import SeededInit

    cfg = tiny_llama_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, head_dim=8, num_hidden_layers=2)
    model = build_gpt_model(cfg)
    hf_state_dict_to_megatron(SeededInit(cfg, seed=3), cfg, model)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=distributed),
                                  model)
    model.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1.0,
                                                 use_distributed_optimizer=distributed), [ddp])
    return model, ddp, opt


def _steps(ddp, opt, first: int, count: int) -> list[float]:
    """Adam steps first..first+count-1; each DP rank draws its own micro-batch of the step."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = []
    for step in range(first, first + count):
        g = torch.Generator().manual_seed(1000 * step + ps.get_data_parallel_rank())
        batch = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g)

        def forward_step(data_iterator, model):
            tokens = next(data_iterator)
            per_token = model(tokens[:, :-1], torch.arange(SEQ).expand(MICRO_BATCH, SEQ), None, labels=tokens[:, 1:])
            return per_token, lambda o: (o.mean(), {"loss": o.mean().detach().clone()})

        ddp.zero_grad_buffer()
        opt.zero_grad()
        stores = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]),
                                             model=[ddp], num_microbatches=1, seq_length=SEQ,
                                             micro_batch_size=MICRO_BATCH)
        ok, _, _ = opt.step()
        assert ok
        out.append(stores[0]["loss"].item())
    return out


def _adam_state(opt) -> list[dict[str, torch.Tensor]]:
    """This rank's Adam state (its shard: main params' moments and step), in parameter order."""
    from tulu.checkpoint.sharded import _megatron_parts

    out = []
    for part in _megatron_parts(opt):
        inner = part.optimizer
        out += [{k: v.clone() for k, v in inner.state[p].items()} for g in inner.param_groups for p in g["params"]]
    return out


def _resume_worker(rank, world_size, tp, root):
    import multiprocessing as mp

    mp.current_process()._config["daemon"] = False  # Megatron's checkpoint writer forks
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from tulu.checkpoint import sharded
    from tulu.checkpoint.sharded import _megatron_parts

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(0)
    model, ddp, opt = _build(distributed=True)
    out = {"distributed": all(isinstance(p, DistributedOptimizer) for p in _megatron_parts(opt)),
           "dp": ps.get_data_parallel_world_size()}
    out["before"] = _steps(ddp, opt, 0, SAVE_AT)
    root = Path(root)
    for d in ("model", "optimizer"):
        (root / d).mkdir(exist_ok=True)
    torch.distributed.barrier()
    sharded.save_model(model, root / "model")
    sharded.save_optimizer(opt, model, root / "optimizer")
    saved = _adam_state(opt)
    out["uninterrupted"] = _steps(ddp, opt, SAVE_AT, CONTINUE)
    out["uninterrupted_step"] = _adam_state(opt)[0]["step"].item()

    model2, ddp2, opt2 = _build(distributed=True)  # a fresh optimizer: no Adam state at all
    sharded.load_model(model2, root / "model")
    sharded.load_optimizer(opt2, model2, root / "optimizer")
    loaded = _adam_state(opt2)
    out["state_keys"] = sorted(saved[0])
    out["state_equal"] = len(saved) == len(loaded) and all(
        s.keys() == l.keys() and all(torch.equal(s[k], l[k]) for k in s) for s, l in zip(saved, loaded))
    out["resumed"] = _steps(ddp2, opt2, SAVE_AT, CONTINUE)
    out["resumed_step"] = _adam_state(opt2)[0]["step"].item()

    # The replicated optimizer from the same start: the same sums in another order.
    _, ddp3, opt3 = _build(distributed=False)
    out["replicated"] = _steps(ddp3, opt3, 0, SAVE_AT + CONTINUE)
    ps.destroy_model_parallel()
    return out


def _resave_worker(rank, world_size, src, dst):
    """Load a checkpoint saved under another DP size and save it again, unchanged."""
    import multiprocessing as mp

    mp.current_process()._config["daemon"] = False
    from megatron.core import parallel_state as ps

    from tulu.checkpoint import sharded

    ps.initialize_model_parallel()
    model, _, opt = _build(distributed=True)
    src, dst = Path(src), Path(dst)
    sharded.load_model(model, src / "model")
    sharded.load_optimizer(opt, model, src / "optimizer")
    (dst / "optimizer").mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    sharded.save_optimizer(opt, model, dst / "optimizer")
    ps.destroy_model_parallel()


RESUME_LAYOUTS = {"dp2": 1, "tp2_dp2": 2}  # name: TP (DP is 2)


@pytest.fixture(scope="module")
def resume(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    out = {}
    for name, tp in RESUME_LAYOUTS.items():
        root = tmp_path_factory.mktemp(name)
        out[name] = root, run_distributed(_resume_worker, 2 * tp, tp, str(root), timeout=180)
    return out


def _ranks(resume):
    for name, (_, ranks) in resume.items():
        for r in ranks:
            yield name, r


def test_distributed_optimizer_runs_on_cpu_with_the_replicated_optimizers_losses(resume):
    for name, r in _ranks(resume):
        assert r["distributed"] and r["dp"] == 2, name
        assert r["before"] + r["uninterrupted"] == pytest.approx(r["replicated"], rel=1e-5), name


def test_fresh_distributed_optimizer_loads_adam_moments_and_step_exactly(resume):
    for name, r in _ranks(resume):
        assert r["state_keys"] == ["exp_avg", "exp_avg_sq", "step"], name
        assert r["state_equal"], name


def test_distributed_optimizer_resume_repeats_the_uninterrupted_losses_bitwise(resume):
    for name, r in _ranks(resume):
        assert r["resumed"] == r["uninterrupted"], name
        assert r["resumed_step"] == r["uninterrupted_step"] == SAVE_AT + CONTINUE, name  # +1 per step


def _flat(tree, prefix=""):
    if isinstance(tree, (dict, list)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        return {k: v for key, sub in items for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _read_checkpoint(folder: Path) -> dict:
    """Every value of a dist_checkpointing folder, full tensors, by dotted key (this process)."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    from tulu.checkpoint.collectives import single_process_group

    with single_process_group():
        return _flat(load_plain_tensors(str(folder)))


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("saved, world", [("dp2", 1), ("dp2", 4), ("tp2_dp2", 1)],
                         ids=["dp2_to_dp1", "dp2_to_dp4", "tp2_dp2_to_tp1_dp1"])
def test_distributed_optimizer_checkpoint_loads_into_another_layout(resume, saved, world, tmp_path):
    """fully_reshardable: loaded under another DP (and TP) size and saved again, every value (main
    params, both moments of every parameter, the step) is the original checkpoint's."""
    root = resume[saved][0]
    original = _read_checkpoint(root / "optimizer")
    assert original["param_state_sharding_type"] == "fully_reshardable"
    run_distributed(_resave_worker, world, str(root), str(tmp_path), timeout=180)
    again = _read_checkpoint(tmp_path / "optimizer")
    assert again.keys() == original.keys()
    assert any(".exp_avg_sq." in k for k in again)
    assert {v for k, v in again.items() if k.endswith(".step")} == {float(SAVE_AT)}
    assert [k for k in original if not _same(original[k], again[k])] == []


# --- through the training job ----------------------------------------------------------------------

def _twin(run_dir: Path) -> dict:
    """A miniature of the flagship training layout: PP2 with uneven stages (3 layers: 1 + 2),
    DP2, the distributed optimizer, bf16 gradient reduction (fp32 parameters on CPU)."""
    return tiny_config("sft", run_dir, pp=2, dp=2, steps=6, **{
        "groups.training.distributed_optimizer": True, "groups.training.grad_dtype": "bf16",
        "model.tiny.num_hidden_layers": 3})


@pytest.fixture(scope="module")
def twin_uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("twin_uninterrupted")
    train(_twin(run_dir))
    return run_dir


def test_interrupted_distributed_optimizer_job_resumes_every_loss_exactly(twin_uninterrupted, tmp_path):
    first = train(_twin(tmp_path), stop_after_steps=3)
    assert {r["stopped_at"] for r in first} == {3}
    second = train(_twin(tmp_path))
    assert {r["start_step"] for r in second} == {3}
    expected, got = losses(twin_uninterrupted), losses(tmp_path)
    assert sorted(got) == list(range(1, 7))
    assert got == expected  # bitwise: weights, Adam moments and step, LR, data position, RNG
    saved = _read_checkpoint(tmp_path / "checkpoints" / "step_3" / "optimizer")
    assert saved["param_state_sharding_type"] == "fully_reshardable"  # the distributed optimizer's

"""On a CPU-only torch, tulu.models.megatron_cpu lets Megatron-core build, train (DDP wrapper,
Adam, gradient clipping, the no-pipelining schedule) and reseed a Llama; the redirects are
idempotent and stay inside the modules they name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest's rootdir is not on sys.path without an install
    sys.path.insert(0, str(ROOT))

from tests.dist_helpers import run_distributed  # noqa: E402

pytestmark = pytest.mark.multiproc


def _train_worker(rank, world_size):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel import schedules

    from tulu.models import megatron_cpu
    from tulu.models.llama import build_gpt_model, tiny_llama_config

    out = {"first_apply": megatron_cpu.apply(), "second_apply": megatron_cpu.apply()}
    out["current_device"] = torch.cuda.current_device()
    out["schedules_zeros"] = str(schedules.torch.zeros([], device="cuda").device)
    try:  # outside the listed modules, torch is untouched
        torch.zeros(1, device="cuda")
        out["global_zeros_cuda"] = "worked"
    except (AssertionError, RuntimeError):
        out["global_zeros_cuda"] = "raised"

    ps.initialize_model_parallel()
    torch.manual_seed(0)
    model = build_gpt_model(tiny_llama_config(num_hidden_layers=2))
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(use_distributed_optimizer=False), model
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.5, use_distributed_optimizer=False),
        [ddp],
    )
    batch = torch.randint(0, 256, (4, 17))

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        loss = model(tokens[:, :-1], torch.arange(16).expand(4, 16), None, labels=tokens[:, 1:])
        return loss, lambda o: (o.mean(), {"loss": o.mean().detach().clone()})

    out["losses"], out["grad_norms"] = [], []
    for _ in range(4):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp],
            num_microbatches=1, seq_length=16, micro_batch_size=4,
        )
        ok, grad_norm, _ = opt.step()
        assert ok
        out["losses"].append(losses[0]["loss"].item())
        out["grad_norms"].append(grad_norm)

    # The model-parallel RNG tracker forks the CPU generator and restores it afterwards.
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    out["fork_restores_default_stream"] = torch.equal(before, torch.get_rng_state())
    out["fork_advances_its_stream"] = not torch.equal(a, b)
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def run():
    return run_distributed(_train_worker, 1, timeout=240)[0]


def test_apply_is_idempotent_and_redirects_current_device(run):
    assert run["first_apply"] is True and run["second_apply"] is True
    assert run["current_device"] == "cpu"


def test_literal_cuda_redirect_stays_inside_the_listed_modules(run):
    assert run["schedules_zeros"] == "cpu"
    assert run["global_zeros_cuda"] == "raised"


def test_megatron_trains_on_cpu_with_ddp_adam_and_grad_clipping(run):
    losses, norms = run["losses"], run["grad_norms"]
    assert all(n == n and n > 0 for n in norms)  # finite, computed
    assert losses[-1] < losses[0] - 0.5, losses


def test_rng_tracker_forks_the_cpu_generator_and_restores_it(run):
    assert run["fork_restores_default_stream"] and run["fork_advances_its_stream"]


def _grad_norm_worker(rank, world_size):
    from tulu.models import megatron_cpu

    megatron_cpu.apply()
    import megatron.core.optimizer.optimizer as opt

    megatron_s = megatron_cpu.original("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32")
    out = []
    for seed in range(10):
        torch.manual_seed(seed)
        grads = [torch.randn(64, 24), torch.randn(9) * 1e-3, torch.randn(4, 4, 4)]
        out.append((opt.get_grad_norm_fp32(grads), megatron_s(grads)))
    out.append((opt.get_grad_norm_fp32(grads, norm_type=float("inf")), megatron_s(grads, norm_type=float("inf"))))
    out.append((opt.get_grad_norm_fp32([]), 0.0))
    return out


def test_the_one_rank_grad_norm_is_megatrons_to_the_bit():
    (pairs,) = run_distributed(_grad_norm_worker, 1, timeout=120)
    for ours, megatron in pairs:
        assert ours == megatron

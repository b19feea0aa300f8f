"""Through submitit's real local executor, a pipeline step (data, pairs, evaluation) runs with the
environment the Slurm path exports: cluster.cpus_per_task threads and the job's cluster.env.
Before, a local step took torch's default (all the cores), which on busy cores collapsed sampling
and changed the float sums against a Slurm run of the same seed."""

import os

import torch

from tulu.config.job import ClusterConfig
from tulu.launch.executor import submit_call


def test_a_local_step_gets_the_slurm_steps_threads_and_environment(tmp_path):
    cluster = ClusterConfig(executor="local", cpus_per_task=1, env={"TULU_PROBE": "from cluster.env"})

    def run(fn, *args):
        return submit_call(fn, *args, name="probe", run_dir=tmp_path, cluster=cluster).result()

    assert run(os.getenv, "OMP_NUM_THREADS") == "1"
    assert run(os.getenv, "TULU_PROBE") == "from cluster.env"
    assert run(torch.get_num_threads) == 1

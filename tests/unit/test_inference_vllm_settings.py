"""The CPU settings the vLLM engine makes for an external_launcher world (no vLLM needed)."""

from __future__ import annotations

import pytest

from tulu.inference.vllm_engine import cpu_threads_bind, prompt_seed


@pytest.mark.parametrize("ranks,cpus,expected", [
    (2, [0, 1], "0|1"),                     # docs/design.md: TP=2 on 2 cores
    (2, [0, 1, 2, 3], "0,1|2,3"),
    (1, [4, 5, 6], "4,5,6"),
    (4, [0, 1], "0|1|0|1"),                 # more ranks than cores: share round-robin
])
def test_each_local_rank_gets_its_own_cores(ranks, cpus, expected):
    assert cpu_threads_bind(ranks, cpus) == expected


def test_prompt_seeds_differ_per_prompt_and_leave_room_for_n_samples():
    seeds = [prompt_seed(5, i) for i in range(100)]
    assert len(set(seeds)) == 100
    assert all(0 <= s < 2**31 - 2**20 for s in seeds)
    assert prompt_seed(5, 3) == prompt_seed(5, 3) != prompt_seed(6, 3)

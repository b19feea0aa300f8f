"""Fixtures for tests that run against the real local Slurm cluster.

The cluster is the one `slurm/local/start.sh` runs on this host (4 nodes n1..n4,
8 CPUs, 4000 MB and 2 fake GPUs each; state in ${TULU_SLURM_HOME:-/tmp/tulu-slurm}).
The session fixture `slurm_cluster` reuses a running cluster, starts one
(idempotently) if it is not up, and FAILS -- never skips -- if it cannot.
Every test collected under tests/slurm/ gets the `slurm` marker.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "slurm" / "local"
START = LOCAL / "start.sh"
STOP = LOCAL / "stop.sh"
NODES = 4  # start.sh defaults: the shape these tests expect
GPUS_PER_NODE = 2
UP_STATES = {"idle", "mixed", "allocated", "completing"}


def slurm_home() -> Path:
    return Path(os.environ.get("TULU_SLURM_HOME", "/tmp/tulu-slurm"))


def read_env_sh(path: Path) -> dict[str, str]:
    """The variables that `source env.sh` would export."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        parts = shlex.split(line, comments=True)
        if len(parts) == 2 and parts[0] == "export" and "=" in parts[1]:
            key, value = parts[1].split("=", 1)
            env[key] = value
    return env


@dataclasses.dataclass
class SlurmCluster:
    home: Path
    env: dict[str, str]  # os.environ plus what env.sh exports
    nodes: int = NODES
    gpus_per_node: int = GPUS_PER_NODE

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sbatch, squeue, sacct...) against the cluster."""
        proc = subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{shlex.join(cmd)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def node_states(self) -> dict[str, tuple[str, str]]:
        """node -> (state, gres) for the nodes of the default partition."""
        out = self.run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %T %G", timeout=20).stdout
        states = {}
        for line in out.splitlines():
            name, state, gres = line.split(None, 2)
            states[name] = (state, gres)
        return states

    def sbatch(self, *args: str) -> int:
        """Submit; return the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return int(out.split(";")[0])

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.25):
        """Poll predicate() until it returns something truthy; fail after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)


def _cluster_is_up(cluster: SlurmCluster) -> bool:
    try:
        states = cluster.node_states()
    except (AssertionError, subprocess.TimeoutExpired, ValueError):
        return False
    return len(states) == NODES and all(
        state in UP_STATES and f"gpu:{GPUS_PER_NODE}" in gres for state, gres in states.values()
    )


def _cluster(home: Path) -> SlurmCluster:
    env = dict(os.environ)
    env_sh = home / "env.sh"
    if env_sh.exists():
        env.update(read_env_sh(env_sh))
    return SlurmCluster(home=home, env=env)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """A running local Slurm cluster; os.environ gets SLURM_CONF etc. (as `source env.sh`)."""
    home = slurm_home()
    cluster = _cluster(home)
    if not (home / "env.sh").exists() or not _cluster_is_up(cluster):
        try:
            proc = subprocess.run(
                ["bash", str(START)], capture_output=True, text=True, timeout=240,
                env={**os.environ, "TULU_SLURM_HOME": str(home)},
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{START} did not finish in 240 s:\n{exc.stderr}", pytrace=False)
        if proc.returncode != 0:
            pytest.fail(
                f"could not start the local Slurm cluster: {START} exited {proc.returncode}\n"
                f"{proc.stderr[-6000:]}{proc.stdout[-2000:]}",
                pytrace=False,
            )
        cluster = _cluster(home)
        if not _cluster_is_up(cluster):
            pytest.fail(f"{START} succeeded but the cluster is not up: {cluster.node_states()}",
                        pytrace=False)
    os.environ.update(read_env_sh(home / "env.sh"))
    return cluster


@pytest.fixture(autouse=True)
def _nodes_drained_by_slow_kills_return(request):
    """Every local "node" is one shared 2-core host: a step whose ranks are reaped slowly under
    load drains its node ("Kill task failed"), and every later test would wait for it. Resume
    such nodes before each test, saying so; any other drain is left for the test to meet."""
    if "slurm_cluster" in request.fixturenames:
        cluster = request.getfixturevalue("slurm_cluster")
        out = cluster.run("sinfo", "-h", "-N", "-t", "drain,drained,draining", "-o", "%N|%E", check=False).stdout
        for node in sorted({line.split("|", 1)[0] for line in out.splitlines() if "Kill task failed" in line}):
            cluster.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
            warnings.warn(f"local Slurm node {node} was drained (Kill task failed); resumed it")
    yield


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.slurm)

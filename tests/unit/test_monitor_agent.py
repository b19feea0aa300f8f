"""The node agent's protocol with the sidecar: heartbeats, stack requests and answers through the
monitor dir, and a silent agent named in the report. Real rank processes (ProgressTracker in a
child) on this host, each record naming a node; the agent of one node runs in a thread."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from monitoring import agent
from monitoring.agent import NodeAgent, agent_liveness, gather_stacks, request_stacks
from monitoring.config import MonitorConfig
from monitoring.detect import Fault
from monitoring.diagnosis import diagnose
from monitoring.record import read_record, record_path
from monitoring.recovery import setup_lines
from monitoring.sidecar import Sidecar, pid_alive

REPO = Path(__file__).resolve().parents[2]
WORLD = 3
CFG = MonitorConfig(check_interval_s=0.2, stack_wait_s=2.0, agent_wait_s=8.0, use_py_spy=False)

RANK = textwrap.dedent("""
    import sys, time
    from monitoring.progress import ProgressTracker
    d, rank, node = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    t = ProgressTracker(d, rank, {world}, node=node, flight_recorder=False)
    with t.phase("train", 3):
        print("ready", flush=True)
        def wait_in_collective():
            time.sleep(120)
        wait_in_collective()
""").format(world=WORLD)


@pytest.fixture
def ranks(tmp_path, monkeypatch):
    """Ranks 0 on n1, 1 on n2, 2 on n3 (all on this host), each waiting in phase train."""
    monkeypatch.delenv("TULU_MONITOR_START", raising=False)
    procs = []
    for rank, node in enumerate(("n1", "n2", "n3")):
        p = subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path), str(rank), node],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        procs.append(p)
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    yield procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait()


def records(d: Path):
    return [read_record(record_path(d, r)) for r in range(WORLD)]


def start_agent(d: Path, node: str, seconds: float = 20.0) -> threading.Thread:
    a = NodeAgent(d, WORLD, CFG, node=node)
    t = threading.Thread(target=a.run, kwargs={"max_seconds": seconds}, daemon=True)
    t.start()
    return t


def test_an_agent_answers_with_the_stacks_of_its_own_ranks_and_names_its_node(tmp_path, ranks):
    start_agent(tmp_path, "n2")
    asked = request_stacks(tmp_path, [records(tmp_path)[1]], wait_s=2.0, use_py_spy=False)
    stacks, agents = gather_stacks(tmp_path, asked, timeout_s=8.0)
    s = stacks[1]
    assert (s.method, s.node) == ("faulthandler", "n2"), s
    assert "wait_in_collective" in s.text and s.proc_state.startswith("S")
    assert agents["n2"]["answered"] and agents["n2"]["ranks"] == [1]
    assert not list((tmp_path / "agents" / "requests" / "n2").glob("*.json")), "request left behind"


def test_a_sigstopped_rank_is_reported_stopped_by_its_node_agent(tmp_path, ranks):
    ranks[1].send_signal(signal.SIGSTOP)
    start_agent(tmp_path, "n2")
    stacks, _ = gather_stacks(tmp_path, request_stacks(tmp_path, [records(tmp_path)[1]], wait_s=2.0,
                                                       use_py_spy=False), timeout_s=8.0)
    assert stacks[1].proc_state.startswith("T"), stacks[1]
    assert stacks[1].method == "proc" and "stopped" in stacks[1].note


def test_an_agent_asked_for_a_rank_of_another_node_does_not_touch_it(tmp_path, ranks):
    # The agent of n2 gets a request naming rank 2 (n3's): it answers "none", sends no signal.
    start_agent(tmp_path, "n2")
    r2 = records(tmp_path)[2]
    r2_as_n2 = type(r2)(**{**{f: getattr(r2, f) for f in r2.__slots__}, "node": "n2"})
    stacks, agents = gather_stacks(tmp_path, request_stacks(tmp_path, [r2_as_n2], wait_s=1.0,
                                                            use_py_spy=False), timeout_s=8.0)
    assert stacks[2].method == "none" and "node n2" in stacks[2].note
    assert not (tmp_path / "stacks" / "rank_00002.txt").read_text()


def test_an_agent_that_does_not_answer_is_named_with_its_last_heartbeat(tmp_path, ranks):
    t0 = time.monotonic()
    stacks, agents = gather_stacks(tmp_path, request_stacks(tmp_path, [records(tmp_path)[2]], wait_s=1.0,
                                                            use_py_spy=False), timeout_s=0.5)
    assert time.monotonic() - t0 < 3.0
    assert agents["n3"]["answered"] is False and "no heartbeat ever" in agents["n3"]["note"]
    assert stacks[2].method == "none" and "agent on n3 did not answer within" in stacks[2].note
    assert not list((tmp_path / "agents" / "requests" / "n3").glob("*.json")), \
        "an unanswered request must be withdrawn"


def test_heartbeats_tell_the_sidecar_which_remote_pids_live(tmp_path, ranks):
    a = NodeAgent(tmp_path, WORLD, CFG, node="n2")
    beat = a.heartbeat()
    assert list(beat["ranks"]) == ["1"] and beat["ranks"]["1"]["alive"]
    r1 = records(tmp_path)[1]
    assert agent_liveness(tmp_path, [r1], max_age_s=10) == {1: True}
    ranks[1].kill()
    ranks[1].wait()
    a.heartbeat()
    assert agent_liveness(tmp_path, [r1], max_age_s=10) == {1: False}
    # A stale heartbeat, or one from an agent that never saw this rank, says nothing.
    beat = json.loads(agent.heartbeat_path(tmp_path, "n2").read_text())
    agent.heartbeat_path(tmp_path, "n2").write_text(json.dumps({**beat, "time": time.time() - 60}))
    assert agent_liveness(tmp_path, [r1], max_age_s=10) == {1: None}
    assert agent_liveness(tmp_path, [records(tmp_path)[2]], max_age_s=10) == {2: None}


def test_the_sidecar_does_not_judge_pids_of_another_node_on_its_own_host(tmp_path, ranks):
    r0, r1, _ = records(tmp_path)
    host = r0.host
    assert pid_alive(r0, host, "n1") is True
    assert pid_alive(r1, host, "n1") is None          # n2's pid: not in n1's process table
    assert pid_alive(r1, host) is True                # no Slurm node known: the host decides


def test_the_sidecar_sees_a_rank_killed_on_another_node_through_that_nodes_heartbeat(tmp_path, ranks):
    host = records(tmp_path)[0].host
    side = Sidecar(tmp_path, WORLD, CFG, host=host, node="n1")
    n2 = NodeAgent(tmp_path, WORLD, CFG, node="n2")
    n2.heartbeat()
    assert side.snapshot()[1] == {0: True, 1: True, 2: None}   # n3 has no agent: unknown
    ranks[1].kill()
    ranks[1].wait()
    n2.heartbeat()
    assert side.snapshot()[1][1] is False


def test_the_hang_report_holds_stacks_from_every_node_and_names_a_silent_agent(tmp_path, ranks):
    ranks[1].send_signal(signal.SIGSTOP)
    start_agent(tmp_path, "n2")                       # n3's agent never started
    cfg = MonitorConfig(**{**CFG.to_dict(), "agent_wait_s": 4.0})
    recs = records(tmp_path)
    report = diagnose(Fault("hang", (0, 2), phase="train", step=3), recs, monitor_dir=tmp_path,
                      cfg=cfg, host=recs[0].host, node="n1")
    st = report.stacks
    assert (st["0"]["method"], st["0"]["node"]) == ("faulthandler", "n1")
    assert (st["1"]["node"], st["1"]["proc_state"][:1]) == ("n2", "T")
    assert st["2"]["method"] == "none" and "n3" in st["2"]["note"]
    assert [(c["rank"], c["node"]) for c in report.culprits] == [(1, "n2")]
    assert report.agents["n2"]["answered"] and not report.agents["n3"]["answered"]
    assert "agent(s) on n3 did not answer" in report.summary
    text = report.to_text()
    assert "--- rank 1 on n2 (proc) T" in text and "n3: NO ANSWER" in text


def _flight_recorder_pipes(d: Path, ranks_with_pipes) -> dict[int, int]:
    """Play ProcessGroupNCCL: give each rank's metadata the flight-recorder stems and open a
    reader on ``<pipe stem><rank>.pipe`` (a FIFO); returns rank -> reader fd."""
    from monitoring.progress import meta_path

    (d / "nccl_trace").mkdir(exist_ok=True)
    env = {"TORCH_NCCL_DEBUG_INFO_PIPE_FILE": str(d / "nccl_trace" / "pipe_rank_"),
           "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(d / "nccl_trace" / "rank_")}
    readers = {}
    for rank in range(WORLD):
        meta = json.loads(meta_path(d, rank).read_text())
        meta_path(d, rank).write_text(json.dumps({**meta, "flight_recorder_env": env}))
        if rank in ranks_with_pipes:
            pipe = d / "nccl_trace" / f"pipe_rank_{rank}.pipe"
            os.mkfifo(pipe)
            readers[rank] = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    return readers


def test_each_node_asks_only_its_own_ranks_flight_recorders_for_a_dump(tmp_path, ranks):
    """A flight-recorder pipe is a FIFO: a write from the batch host never reaches a rank on
    another node, so the sidecar asks its node's ranks and each agent asks its own."""
    readers = _flight_recorder_pipes(tmp_path, (0, 1))
    start_agent(tmp_path, "n2")                       # n3's agent never started
    cfg = MonitorConfig(**{**CFG.to_dict(), "agent_wait_s": 4.0})
    recs = records(tmp_path)
    report = diagnose(Fault("hang", (0, 2), phase="train", step=3), recs, monitor_dir=tmp_path,
                      cfg=cfg, host=recs[0].host, node="n1")
    got = {r: os.read(fd, 16) for r, fd in readers.items()}
    for fd in readers.values():
        os.close(fd)
    assert got == {0: b"1", 1: b"1"}                  # one request each: rank 1's by n2's agent only
    fr = report.flight_recorder
    assert fr["requested"] == [0, 1] and fr["missing_pipe"] == []      # rank 2: its agent is silent
    assert fr["dump_files"] == [str(tmp_path / "nccl_trace" / f"rank_{r}") for r in (0, 1)]
    assert report.agents["n2"]["flight_recorder"]["requested"] == [1]


def test_the_batch_script_starts_one_agent_per_node_beside_the_main_step_and_ends_it():
    lines = setup_lines("/runs/a b/monitor", 8)
    (start,) = [line for line in lines if "monitoring.agent" in line]
    assert start.startswith('if [ -n "${SLURM_JOB_ID:-}" ]; then srun --overlap ')
    assert "--ntasks-per-node=1" in start and "--kill-on-bad-exit=0" in start
    assert start.endswith("& TULU_AGENTS_PID=$!; fi")
    assert "'/runs/a b/monitor'" in start
    assert any("kill \"$TULU_SIDECAR_PID\" $TULU_AGENTS_PID" in line for line in lines)
    assert lines.index(start) < lines.index("trap _tulu_on_exit EXIT")
    # The sidecar learns its node from the batch script (empty outside Slurm: host-only view).
    (sidecar,) = [line for line in lines if "monitoring.sidecar" in line]
    assert '--node "${SLURMD_NODENAME:-}"' in sidecar

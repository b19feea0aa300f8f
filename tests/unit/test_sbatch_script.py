"""The generated sbatch script, against a golden file, in a run folder whose name has spaces
and quotes (shell quoting bugs are security bugs)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tulu.config.job import load_config
from tulu.launch.executor import sbatch_script
from tulu.plan.layout import build_plan

GOLDEN = Path(__file__).parent / "golden" / "tiny-cpu-rehearse.sbatch"
WEIRD = "runs/it's a \"weird\" $dir `x`"


@pytest.fixture
def weird_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path / WEIRD


def _script(run_dir: Path) -> str:
    cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny-cpu-rehearse.yaml")
    cfg.run.dir = str(run_dir)
    return sbatch_script(cfg, build_plan(cfg))


def _normalise(text: str, run_dir: Path) -> str:
    tmp = str(run_dir.resolve().parents[1])  # pytest's tmp_path: plain characters only
    repo = str(Path(__file__).resolve().parents[2])
    return text.replace(tmp, "<TMP>").replace(shlex.quote(sys.executable), "<PYTHON>").replace(repo, "<REPO>")


def test_sbatch_script_matches_golden_file(weird_run_dir):
    got = _normalise(_script(weird_run_dir), weird_run_dir)
    if os.environ.get("TULU_UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text(), "regenerate with TULU_UPDATE_GOLDEN=1 if the change is intended"


def test_sbatch_script_has_the_plans_resources(weird_run_dir):
    text = _script(weird_run_dir)
    for flag in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@30", "#SBATCH --time=10", "#SBATCH --open-mode=append"):
        assert flag in text
    assert "--kill-on-bad-exit=1" in text


def test_weird_run_folder_survives_shell_quoting(weird_run_dir):
    text = _script(weird_run_dir)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    setup = text.split("# setup", 1)[1].split("# command", 1)[0]
    exports = "\n".join(line for line in setup.splitlines() if line.startswith("export "))
    out = subprocess.run(["bash", "-c", exports + '\nprintf %s "$TULU_RUN_DIR"'], capture_output=True, text=True)
    assert out.stdout == str(weird_run_dir.resolve())
    # #SBATCH lines are read by sbatch, not bash: check the log path is one quoted word.
    output_line = next(line for line in text.splitlines() if line.startswith("#SBATCH --output="))
    assert shlex.split(output_line.split("=", 1)[1]) == [str(weird_run_dir.resolve() / "logs" / "%j" / "%j_0_log.out")]


def test_a_monitor_that_cannot_be_imported_stops_the_submission(monkeypatch, tmp_path):
    """Never a silent job without hang detection or the crash-requeue EXIT trap."""
    import sys

    from tulu.config.job import ConfigError, load_config
    from tulu.launch import executor
    from tulu.plan.layout import build_plan

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu-rehearse.yaml",
                      [f"run.dir={tmp_path}/run"])
    monkeypatch.setitem(sys.modules, "monitoring.recovery", None)   # import fails
    with pytest.raises(ConfigError) as err:
        executor.sbatch_script(cfg, build_plan(cfg))
    assert err.value.key == "monitoring.enabled"
    cfg.monitoring.enabled = False                                   # the explicit opt-out
    assert "monitoring.sidecar" not in executor.sbatch_script(cfg, build_plan(cfg))


def test_spare_nodes_are_allocated_and_the_training_step_runs_in_the_restart_loop_on_the_active_nodes(weird_run_dir):
    cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny-cpu-rehearse.yaml",
                      ["cluster.nodes=2", "cluster.spare_nodes=1", "groups.training.dp=1"])
    cfg.run.dir = str(weird_run_dir)
    text = sbatch_script(cfg, build_plan(cfg))
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert "#SBATCH --nodes=3" in text                      # 2 for the step + 1 spare
    assert "-m monitoring.injob start" in text and "--nodes 2" in text
    command = text.split("# command", 1)[1]
    (step,) = [line.strip() for line in command.splitlines() if line.strip().startswith("srun ")]
    assert step.startswith("srun --nodes=2 --ntasks=4 --ntasks-per-node=2 --nodelist=")
    assert "--kill-on-bad-exit=1" in step and "submitit.core._submit" in step
    assert "while :; do" in command and '[ "$TULU_DECIDED" -eq 80 ]' in command

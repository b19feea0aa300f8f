"""The user-facing submitit scripts in `jobs/`: each runs as `python jobs/X.py` from any folder
through the installed package (no `sys.path` edits), stands alone when copied elsewhere, and
submits what `tulu submit` would (checked with --dry-run: the sbatch script, nothing submitted)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "jobs").glob("*.py"))


def _run(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_every_script_imports_only_the_public_package_and_edits_no_path():
    assert {s.name for s in SCRIPTS} == {"sft.py", "dpo.py", "rlvr.py", "rehearse.py", "submit.py"}
    for script in SCRIPTS:
        tree = ast.parse(script.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert imported <= {"sys", "pathlib", "tulu"}, (script.name, imported)
        assert "sys.path" not in script.read_text(), script.name


@pytest.mark.parametrize("stage", ["sft", "dpo", "rlvr"])
def test_a_stage_script_dry_runs_its_default_config_from_another_folder(stage, tmp_path):
    done = _run(REPO / "jobs" / f"{stage}.py", "--dry-run", "--set", "cluster.executor=slurm", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH" in done.stdout and "--requeue" in done.stdout
    assert f"#SBATCH --job-name=tiny-cpu-{stage}" in done.stdout


def test_a_copied_script_still_submits_and_a_bad_key_is_refused_by_name(tmp_path):
    copy = tmp_path / "my_rlvr.py"
    shutil.copy(REPO / "jobs" / "rlvr.py", copy)
    config = REPO / "configs" / "tiny-cpu-rlvr.yaml"
    done = _run(copy, str(config), "--dry-run", "--set", "cluster.executor=slurm", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    bad = _run(copy, str(config), "--dry-run", "--set", "rlvr.no_such_key=1", cwd=tmp_path)
    assert bad.returncode == 2 and "rlvr.no_such_key" in bad.stderr


def test_rehearse_and_submit_scripts_choose_the_mode(tmp_path):
    done = _run(REPO / "jobs" / "rehearse.py", "--dry-run", "--set", "cluster.executor=slurm", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --job-name=tiny-cpu-rehearse" in done.stdout and "#SBATCH --nodes=4" in done.stdout
    plain = _run(REPO / "jobs" / "submit.py", cwd=tmp_path)
    assert plain.returncode == 2  # CONFIG is required

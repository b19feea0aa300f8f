"""The `tulu` command as a new user meets it: a mistyped path destroys nothing, every subcommand
helps, and a mistake ends in one line naming the key or path, never a traceback.

Each case runs the installed console script (`.venv/bin/tulu`) in a temporary workspace whose
HOME and TULU_HOME lie inside it, and checks the exit status, the message, that no "Traceback"
appears, and that every file in the workspace before the call is still there with the same bytes.
Paths outside the workspace (`/`, this repository) are only ever given with `--dry-run`, or to
`refusal`, which deletes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tulu.config.job import apply_overrides, load_config
from tulu.deletion import DeleteRefused, refusal, remove_tree

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
TULU = Path(sys.executable).parent / "tulu"
SUBCOMMANDS = ("plan", "submit", "rehearse", "pipeline", "logs", "status", "cancel", "score", "export")

needs_console_script = pytest.mark.skipif(not TULU.exists(), reason=f"no console script at {TULU} (pip install -e .)")


# ------------------------------------------------------------------ workspace
def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _fake_command(bindir: Path, name: str, message: str) -> None:
    script = _write(bindir / name, f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
    script.chmod(0o755)


@pytest.fixture
def ws(tmp_path) -> Path:
    """ws/work (the working folder), ws/home (HOME), fake Slurm commands that fail, and inputs."""
    work, home = tmp_path / "work", tmp_path / "home"
    _write(home / "notes.txt", "the user's own notes\n")
    _write(home / "job.yaml", (CONFIGS / "tiny-cpu-sft.yaml").read_bytes())
    row = json.dumps({"dataset": "gsm8k", "completion": "so 72", "ground_truth": "72"})
    _write(work / "in.jsonl", f"{row}\nnot json\n".encode() + b'{"completion": "\xff\xfe"}\n')
    (work / "link.jsonl").symlink_to("in.jsonl")
    os.link(work / "in.jsonl", work / "hard.jsonl")
    _write(work / "dup.yaml", "stage: sft\nrun: {name: x}\nstage: dpo\n")
    _write(work / "empty.yaml", "")
    _write(work / "comments.yaml", "# nothing but a comment\n")
    _write(work / "binary.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    _write(work / "ck" / "step_1" / "manifest.json", "{}")  # looks committed; does not verify
    (work / "emptyck").mkdir()
    _write(work / "outdir" / "mine.txt", "not an export\n")
    # a pipeline folder this pipeline made, with a file the user put there
    _write(work / "runs" / "owned" / "pipeline.json", json.dumps({"name": "owned", "steps": []}))
    _write(work / "runs" / "owned" / "sft" / "metrics.jsonl", "{}\n")
    _write(work / "runs" / "owned" / "notes.txt", "keep me\n")
    _write(work / "runs" / "stranger" / "thesis.tex", "not the pipeline's\n")
    _write(tmp_path / "otherrepo" / ".git" / "HEAD", "ref: refs/heads/main\n")
    _write(tmp_path / "otherrepo" / "src.py", "print('hi')\n")
    # a run folder (job 11, two ranks, logs of both) and a pipeline folder with a stage without logs
    _write(work / "run1" / "jobs.jsonl", json.dumps({"job_id": "11", "submitted": 1.0}) + "\n")
    cfg = load_config(CONFIGS / "tiny-cpu-sft.yaml")
    _write(work / "run1" / "config.json", json.dumps(cfg.to_dict()))
    _write(work / "run1" / "logs" / "11" / "11_0_log.out", "rank zero says hi\n")
    _write(work / "run1" / "logs" / "11" / "11_1_log.err", "rank one says hi\n")
    _write(work / "pipe" / "pipeline.json", json.dumps({"name": "pipe", "executor": "slurm", "steps": []}))
    (work / "pipe" / "sft" / "logs" / "21").mkdir(parents=True)
    _write(work / "pipe" / "sft" / "jobs.jsonl", json.dumps({"job_id": "21", "submitted": 1.0}) + "\n")
    for name in ("sbatch", "sacct", "scontrol", "scancel"):
        _fake_command(tmp_path / "bin", name, f"{name}: error: Unable to contact slurm controller")
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every file and link under `root` -> a hash of its bytes (or link target)."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            found[rel] = ("link:" + os.readlink(p)) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def tulu(ws: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(ws / "home"), TULU_HOME=str(ws / "home" / ".tulu"),
               PATH=f"{ws / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    env.pop("TULU_DEBUG", None)
    if debug:
        env["TULU_DEBUG"] = "1"
    return subprocess.run([str(TULU), *args], cwd=ws / "work", env=env, capture_output=True, text=True,
                          timeout=300)


# ------------------------------------------------------------------ the cases
SMALL_PIPELINE = ["--set", "pipeline.executor=slurm", "--set", "pipeline.tasks.sft_per_task=4",
                  "--set", "pipeline.tasks.train_per_task=4", "--set", "pipeline.tasks.heldout_per_task=2"]
PIPELINE = str(CONFIGS / "tiny-cpu.yaml")
JOB = str(CONFIGS / "tiny-cpu-sft.yaml")


@dataclass
class Case:
    id: str
    args: list[str]  # `{ws}` and `{repo}` are replaced
    says: tuple[str, ...]  # in stdout + stderr
    rc: int = 2
    kept: Callable[[str], bool] = lambda rel: True  # which files must keep their bytes (default: all)
    then: Callable[[Path], None] | None = None  # more checks on the workspace
    not_says: tuple[str, ...] = ()


def _fresh_deleted_only_what_the_pipeline_wrote(ws: Path) -> None:
    owned = ws / "work" / "runs" / "owned"
    assert not (owned / "sft" / "metrics.jsonl").exists()  # the pipeline's stage output: gone
    assert (owned / "notes.txt").read_text() == "keep me\n"
    assert json.loads((owned / "pipeline.json").read_text())["name"] == "owned"


CASES = [
    # destructive before: --fresh deleted whatever pipeline.name / pipeline.dir pointed at
    Case("fresh-name-dotdot", ["pipeline", PIPELINE, "--set", "pipeline.name=..", "--fresh"], ("pipeline.name",)),
    Case("fresh-name-with-slash", ["pipeline", PIPELINE, "--set", "pipeline.name=a/../..", "--fresh"],
         ("pipeline.name",)),
    Case("fresh-dir-working-folder", ["pipeline", PIPELINE, "--set", "pipeline.dir=.", "--fresh"],
         ("pipeline.dir", "working folder")),
    Case("fresh-dir-holds-working-and-home", ["pipeline", PIPELINE, "--set", "pipeline.dir=..", "--fresh"],
         ("pipeline.dir", "it holds")),
    Case("fresh-dir-home-tilde", ["pipeline", PIPELINE, "--set", "pipeline.dir=~/", "--fresh"],
         ("pipeline.dir", "home folder")),
    Case("fresh-dir-home-absolute", ["pipeline", PIPELINE, "--set", "pipeline.dir={ws}/home", "--fresh"],
         ("pipeline.dir", "home folder")),
    Case("fresh-dir-git-repository", ["pipeline", PIPELINE, "--set", "pipeline.dir={ws}/otherrepo", "--fresh"],
         ("pipeline.dir", "git repository")),
    Case("fresh-dir-root-dry-run", ["pipeline", PIPELINE, "--set", "pipeline.dir=/", "--fresh", "--dry-run"],
         ("pipeline.dir", "root folder")),
    Case("fresh-dir-this-repository-dry-run", ["pipeline", PIPELINE, "--set", "pipeline.dir={repo}", "--fresh",
                                               "--dry-run"], ("pipeline.dir", "repository")),
    Case("fresh-folder-not-made-by-the-pipeline", ["pipeline", PIPELINE, "--set", "pipeline.name=stranger", "--fresh"],
         ("refusing to delete", "runs/stranger", "no pipeline.json")),
    Case("fresh-folder-of-another-pipeline", ["pipeline", PIPELINE, "--set", "pipeline.name=other",
                                              "--set", "pipeline.dir=runs/owned", "--fresh"],
         ("refusing to delete", "runs/owned", "'owned'")),
    Case("resume-into-a-folder-of-other-files", ["pipeline", PIPELINE, "--set", "pipeline.name=stranger", "--dry-run"],
         ("runs/stranger", "no pipeline.json")),
    Case("dry-run-refuses-more-held-out-prompts-than-exist",
         ["pipeline", PIPELINE, "--set", "pipeline.tasks.heldout_per_task={gsm8k: 300, ifeval: 300, math: 115}",
          "--dry-run"], ("pipeline.tasks.heldout_per_task.math", "got 115", "only 114 distinct held-out math")),
    Case("fresh-dry-run-lists-what-it-would-delete", ["pipeline", PIPELINE, "--set", "pipeline.name=owned", "--fresh",
                                                      "--dry-run"], ("would delete", "sft", "keep: notes.txt"), rc=0),
    Case("fresh-keeps-a-file-the-pipeline-did-not-write",
         ["pipeline", PIPELINE, "--set", "pipeline.name=owned", "--fresh", *SMALL_PIPELINE],
         ("kept notes.txt", "Slurm command failed", "Unable to contact slurm controller"),  # the fake sbatch stops it
         kept=lambda rel: not rel.startswith("work/runs/owned/") or rel == "work/runs/owned/notes.txt",
         then=_fresh_deleted_only_what_the_pipeline_wrote),
    Case("score-out-is-the-input", ["score", "in.jsonl", "--out", "in.jsonl"], ("--out is the input", "in.jsonl")),
    Case("score-out-is-a-link-to-the-input", ["score", "in.jsonl", "--out", "link.jsonl"],
         ("--out is the input", "link.jsonl")),
    Case("score-out-is-a-hard-link-to-the-input", ["score", "in.jsonl", "--out", "hard.jsonl"],
         ("--out is the input", "hard.jsonl")),
    Case("score-out-is-the-input-through-a-new-folder", ["score", "in.jsonl", "--out", "new/../in.jsonl"],
         ("--out is the input",), then=lambda ws: not (ws / "work" / "new").exists() or pytest.fail("made new/")),
    Case("export-into-a-non-empty-folder", ["export", "ck", "outdir"], ("not empty", "outdir", "--force")),
    Case("export-into-the-checkpoint", ["export", "ck", "ck/step_1/hf"], ("overwrite the checkpoint", "ck/step_1/hf")),
    Case("export-force-into-the-working-folder", ["export", "ck", ".", "--force"], ("overwrite the checkpoint",)),
    Case("export-force-into-home", ["export", "ck", "~", "--force"], ("refusing to replace", "home folder")),
    Case("yaml-key-written-twice", ["plan", "dup.yaml"], ("stage", "written twice", "lines 1 and 3")),
    # confusing before
    Case("version", ["--version"], ("tulu 0.1",), rc=0),
    Case("score-options-before-the-input", ["score", "--out", "scored.jsonl", "--workers", "1", "in.jsonl"],
         ("in.jsonl:2: bad row: not JSON", "in.jsonl:3: bad row: not UTF-8 (byte 0xff", '"rows": 3'), rc=0,
         then=lambda ws: len((ws / "work" / "scored.jsonl").read_text().splitlines()) == 3 or pytest.fail("rows")),
    Case("score-input-missing", ["score", "missing.jsonl", "--out", "o.jsonl"],
         ("input file not found", "missing.jsonl")),
    Case("score-input-is-a-folder", ["score", "ck", "--out", "o.jsonl"], ("is a folder", "ck")),
    Case("score-out-is-a-folder", ["score", "in.jsonl", "--out", "outdir"], ("--out is a folder", "outdir")),
    Case("score-bad-workers", ["score", "in.jsonl", "--out", "o.jsonl", "--workers", "0"], ("--workers",)),
    Case("export-checkpoint-missing-is-quick", ["export", "nope", "out"], ("checkpoint not found", "nope"),
         not_says=("Apex", "Transformer Engine")),
    Case("export-checkpoint-is-a-file", ["export", "in.jsonl", "out"], ("not a folder", "in.jsonl")),
    Case("export-checkpoint-folder-without-checkpoint", ["export", "emptyck", "out"],
         ("no committed checkpoint", "emptyck")),
    Case("config-empty", ["plan", "empty.yaml"], ("empty.yaml", "empty")),
    Case("config-only-comments", ["plan", "comments.yaml"], ("comments.yaml", "empty")),
    Case("config-binary", ["plan", "binary.yaml"], ("binary.yaml", "not UTF-8")),
    Case("config-missing", ["plan", "nope.yaml"], ("nope.yaml", "No such file")),
    Case("config-is-a-folder", ["plan", "ck"], ("ck", "directory")),
    Case("pp-error-lists-pp-values", ["plan", JOB, "--set", "groups.training.pp=3"],
         ("groups.training.pp", "Allowed PP values"), not_says=("Allowed TP",)),
    Case("set-without-key", ["plan", JOB, "--set", "=5"], ("needs a key",)),
    Case("set-with-empty-key-part", ["plan", JOB, "--set", "sft..lr=5"], ("sft..lr", "needs a key")),
    Case("set-mapping-merges-into-the-section", ["plan", JOB, "--set", "sft.optim={bogus: 1}"],
         ("sft.optim.bogus", "unknown key")),
    Case("set-value-not-yaml", ["plan", JOB, "--set", "sft.epochs=[1"], ("--set sft.epochs", "not valid YAML")),
    Case("tilde-in-config-path", ["plan", "~/job.yaml"], ("training group",), rc=0),
    Case("tilde-in-pipeline-dir", ["pipeline", PIPELINE, "--set", "pipeline.dir=~/runs/{name}", "--dry-run"],
         ("{ws}/home/runs/tiny-cpu/sft",), rc=0),
    Case("plan-of-a-pipeline-config-plans-each-stage", ["plan", PIPELINE],
         ("pipeline config", "# stage sft", "# stage rlvr"), rc=0),
    Case("submit-of-a-pipeline-config", ["submit", PIPELINE, "--dry-run"],
         ("a pipeline config, not a job config", "tulu pipeline")),
    Case("rehearse-of-a-pipeline-config", ["rehearse", PIPELINE, "--dry-run"], ("a pipeline config", "tulu pipeline")),
    Case("pipeline-of-a-job-config", ["pipeline", JOB, "--dry-run"], ("a job config", "tulu submit")),
    Case("logs-of-a-run-folder", ["logs", "run1"], ("rank zero says hi", "rank one says hi"), rc=0),
    Case("logs-rank-that-does-not-exist", ["logs", "run1", "--rank", "5"], ("no rank 5", "job 11", "0-1")),
    Case("logs-group-that-does-not-exist", ["logs", "run1", "--group", "inference"],
         ("no inference group", "training (ranks 0-1)")),
    Case("logs-negative-lines", ["logs", "run1", "-n", "-3"], ("-n/--lines", ">= 0")),
    Case("logs-of-a-pipeline-folder", ["logs", "pipe"], ("a pipeline folder", "pipe/sft")),
    Case("logs-of-a-stage-without-logs", ["logs", "pipe/sft"], ("no logs yet", "logs/21")),
    Case("logs-of-a-folder-that-is-no-run", ["logs", "ck"], ("not a run folder", "ck")),
    Case("logs-of-an-unknown-job", ["logs", "999"], ("no such job", "999")),
    Case("status-when-slurm-does-not-answer", ["status", "run1"],
         ("Slurm did not answer", "job 11", "Unable to contact slurm controller")),
    Case("cancel-when-slurm-does-not-answer", ["cancel", "run1"], ("scancel failed", "job 11")),
]


@needs_console_script
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tulu_refuses_or_helps_and_keeps_every_file(ws, case):
    before = snapshot(ws)
    args = [a.replace("{ws}", str(ws)).replace("{repo}", str(REPO)) for a in case.args]
    t0 = time.time()
    r = tulu(ws, *args)
    output = r.stdout + r.stderr
    assert r.returncode == case.rc, output[-3000:]
    for text in case.says:
        assert text.replace("{ws}", str(ws)) in output, output[-3000:]
    for text in case.not_says:
        assert text not in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    if case.rc == 2 and "usage:" not in r.stderr:
        assert r.stderr.strip().splitlines()[-1].startswith("tulu: "), r.stderr
    after = snapshot(ws)
    changed = [rel for rel, digest in before.items() if case.kept(rel) and after.get(rel) != digest]
    assert not changed, f"changed or deleted: {changed}"
    if case.then:
        case.then(ws)
    assert time.time() - t0 < 120


@needs_console_script
@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, tmp_path):
    r = subprocess.run([str(TULU), command, "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"usage: tulu {command}" in r.stdout


@needs_console_script
def test_help_texts_show_a_config_of_the_right_kind():
    def helptext(*args):
        return subprocess.run([str(TULU), *args, "--help"], capture_output=True, text=True, timeout=120).stdout

    assert "configs/tiny-cpu.yaml" in helptext("pipeline")
    assert "configs/tiny-cpu-sft.yaml" not in helptext("pipeline").split("examples:")[0]
    assert "configs/tiny-cpu-sft.yaml" in helptext("submit")
    assert "tulu pipeline configs/tiny-cpu.yaml" in helptext()


@needs_console_script
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes anything")
def test_unreadable_input_and_unwritable_output_are_one_line_errors(ws):
    work = ws / "work"
    (work / "in.jsonl").chmod(0)
    (work / "outdir").chmod(0o500)
    try:
        r = tulu(ws, "score", "in.jsonl", "--out", "o.jsonl")
        assert r.returncode == 2 and "permission denied" in r.stderr and "in.jsonl" in r.stderr, r.stderr
        (work / "in.jsonl").chmod(0o644)
        r = tulu(ws, "score", "in.jsonl", "--out", "outdir/o.jsonl")
        assert r.returncode == 2 and "Permission denied" in r.stderr and "outdir" in r.stderr, r.stderr
        r = tulu(ws, "export", "ck", "outdir/hf")
        assert r.returncode == 2 and "permission denied" in r.stderr and "outdir" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        (work / "in.jsonl").chmod(0o644)
        (work / "outdir").chmod(0o755)


@needs_console_script
def test_debug_shows_the_traceback(ws):
    r = tulu(ws, "plan", "empty.yaml", debug=True)
    assert r.returncode == 2 and "Traceback" in r.stderr and "tulu: config error" in r.stderr


# ------------------------------------------------------------------ in-process promises
def test_refusal_names_root_home_working_folder_and_this_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "work").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "home" / "work")
    assert "root folder" in refusal("/")
    assert "home folder" in refusal(tmp_path / "home")
    assert "home folder" in refusal("~")
    assert "working folder" in refusal(".")
    assert "it holds" in refusal(tmp_path)
    assert "repository" in refusal(REPO)
    # it holds the repository (or first the test's home, where the clone itself lives under /tmp)
    assert "it holds" in refusal(REPO.parent)
    (tmp_path / "link").symlink_to("/")
    assert "root folder" in refusal(tmp_path / "link")
    assert refusal(tmp_path / "home" / "work" / "runs" / "x") is None


def test_remove_tree_refuses_with_the_path_and_deletes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _write(tmp_path / "home" / "keep.txt", "x")
    with pytest.raises(DeleteRefused, match=str(tmp_path / "home")):
        remove_tree(tmp_path / "home")
    assert (tmp_path / "home" / "keep.txt").exists()
    _write(tmp_path / "repo" / ".git" / "HEAD", "x")
    with pytest.raises(DeleteRefused, match="git repository"):
        remove_tree(tmp_path / "repo")
    _write(tmp_path / "scratch" / "a" / "b.txt", "x")
    remove_tree(tmp_path / "scratch")
    remove_tree(tmp_path / "scratch")  # already gone: nothing to do
    assert not (tmp_path / "scratch").exists()


def test_a_mapping_override_merges_into_the_section():
    data = apply_overrides({"sft": {"optim": {"lr": 1.0, "min_lr": 0.5}}}, ["sft.optim={lr: 2.0}"])
    assert data["sft"]["optim"] == {"lr": 2.0, "min_lr": 0.5}
    data = apply_overrides({"sft": None}, ["sft.epochs=3"])  # an empty section in the YAML
    assert data == {"sft": {"epochs": 3}}


def test_paths_in_a_config_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(CONFIGS / "tiny-cpu-sft.yaml", ["run.dir=~/runs/{name}", "data.cache_dir=~/cache"])
    assert cfg.run_dir == tmp_path / "runs" / "tiny-cpu-sft"
    assert cfg.data.cache_dir == str(tmp_path / "cache")

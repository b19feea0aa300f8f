"""The GPU install path (issue 14): `scripts/setup.sh --gpu`, requirements-gpu.txt and the
resolution check. Offline except the two tests that ask PyPI to resolve a planted bad set
(skipped when PyPI cannot be reached); nothing here installs a package."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PINS = REPO / "requirements-gpu.txt"
CHECK = REPO / "scripts" / "check_gpu_resolution.py"


def _check_module():
    spec = importlib.util.spec_from_file_location("check_gpu_resolution", CHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pins() -> dict[str, str]:
    return dict(_check_module().read_pins(PINS))


def _pyproject_pin(name: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if re.match(rf"{re.escape(name)}\s*[=<>]", d))


def _latest_results() -> dict:
    found = sorted((REPO / "bench" / "results").glob("gpu_resolution-*.json"))
    assert found, "no bench/results/gpu_resolution-*.json: run scripts/check_gpu_resolution.py --results ..."
    return json.loads(found[-1].read_text())


def _setup(*args, env=None):
    return subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5).close()
        return True
    except OSError:
        return False


def _check_or_skip(requirements) -> subprocess.CompletedProcess:
    """The check on a planted set; exit 3 (pip or the network failed, no verdict) skips, so a
    registry hiccup is reported as such instead of as a wrong resolution."""
    r = subprocess.run([sys.executable, str(CHECK), "-r", str(requirements), "--no-project"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode == 3:
        pytest.skip(f"the resolution check could not reach a verdict (exit 3): {r.stderr.strip()[-300:]}")
    return r


needs_pypi = pytest.mark.skipif(not _pypi_reachable(),
                                reason="PyPI (https://pypi.org) is not reachable from here")


def test_setup_help_documents_gpu_mode_and_touches_nothing():
    r = _setup("--help")
    assert r.returncode == 0, r.stderr
    assert "--gpu" in r.stdout and "requirements-gpu.txt" in r.stdout
    assert "[setup]" not in r.stdout  # it printed usage and did no step


def test_setup_unknown_argument_is_refused_with_the_valid_ones():
    r = _setup("--cuda")
    assert r.returncode == 2
    assert "'--cuda'" in r.stderr and "--gpu" in r.stderr


def test_setup_check_alone_needs_gpu_mode():
    r = _setup("--check")
    assert r.returncode == 2 and "--gpu --check" in r.stderr


def test_gpu_check_without_a_venv_says_how_to_make_one(tmp_path):
    r = _setup("--gpu", "--check", env={"TULU_VENV": str(tmp_path / "none")})
    assert r.returncode == 2 and "scripts/setup.sh --gpu" in r.stderr


def test_gpu_mode_refuses_a_venv_holding_cpu_torch(tmp_path):
    # A stand-in venv whose python says what a CPU torch says for torch.version.cuda.
    venv = tmp_path / "venv with space"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\necho None\n")
    (venv / "bin" / "python").chmod(0o755)
    r = _setup("--gpu", env={"TULU_VENV": str(venv)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "CPU build of torch" in r.stderr and "installing" not in r.stdout


def test_requirements_gpu_pins_every_package_exactly():
    lines = [l.split("#", 1)[0].strip() for l in PINS.read_text().splitlines()]
    lines = [l for l in lines if l]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+", l) for l in lines), lines
    pins = _pins()
    for name in ("torch", "vllm", "megatron-core", "transformer-engine",
                 "transformer-engine-cu13", "transformer-engine-torch"):
        assert name in pins, f"requirements-gpu.txt does not pin {name}"


def test_gpu_set_keeps_pyprojects_torch_megatron_and_transformers_range():
    pins = _pins()
    assert _pyproject_pin("torch") == f"torch=={pins['torch']}"
    assert _pyproject_pin("megatron-core") == f"megatron-core=={pins['megatron-core']}"
    lo, hi = re.search(r">=([\d.]+),<([\d.]+)", _pyproject_pin("transformers")).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))
    assert as_tuple(lo) <= as_tuple(pins["transformers"]) < as_tuple(hi)


def test_recorded_resolution_is_of_this_requirements_file():
    res = _latest_results()
    assert res["resolves"] is True
    assert res["requirements_sha256"] == hashlib.sha256(PINS.read_bytes()).hexdigest(), (
        "requirements-gpu.txt changed since the recorded resolution; rerun "
        "scripts/check_gpu_resolution.py --results bench/results/gpu_resolution-<date>.json")


def test_torch_pin_is_what_the_pinned_vllm_requires():
    res, pins = _latest_results(), _pins()
    assert res["resolved"]["vllm"] == pins["vllm"]
    assert res["vllm_requires_torch"] == [f"torch=={pins['torch']}"]


def test_transformer_engine_core_matches_the_torch_cuda_major():
    res, pins = _latest_results(), _pins()
    core = f"transformer-engine-cu{res['torch_cuda_major']}"
    assert core in pins
    declared = res["sdist_only"]["transformer-engine-torch"]["requires_dist"]
    assert f"transformer_engine_cu{res['torch_cuda_major']}=={pins[core]}" in declared


def test_check_refuses_a_line_that_is_not_an_exact_pin(tmp_path):
    bad = tmp_path / "req.txt"
    bad.write_text("torch>=2.13\n")
    r = subprocess.run([sys.executable, str(CHECK), "-r", str(bad), "--no-project"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "not an exact pin" in r.stderr


def test_conflict_message_is_pips_cause_lines():
    out = ("ERROR: Cannot install torch==2.12.0 and vllm==0.32.0 because these package versions "
           "have conflicting dependencies.\n\nThe conflict is caused by:\n"
           "    The user requested torch==2.12.0\n    vllm 0.32.0 depends on torch==2.13.0\n\n"
           "To fix this you could try to:\n")
    assert _check_module().conflict_message(out) == (
        "The user requested torch==2.12.0\nvllm 0.32.0 depends on torch==2.13.0")


@needs_pypi
@pytest.mark.parametrize("planted,named", [
    # a torch the pinned vLLM does not accept: pip's own cause lines name both
    ("torch==2.12.0\nvllm==0.32.0\n",
     ["does not resolve", "torch==2.12.0", "vllm 0.32.0 depends on torch==2.13.0"]),
    # a Transformer Engine core built for another CUDA major than torch's
    ("torch==2.13.0\ntransformer-engine-cu12==2.20.2\n", ["transformer-engine-cu12", "transformer-engine-cu13"]),
], ids=["torch_vs_vllm", "te_core_cuda"])
def test_check_fails_on_a_planted_conflict_naming_its_packages(tmp_path, planted, named):
    bad = tmp_path / "req.txt"
    bad.write_text(planted)
    r = _check_or_skip(bad)
    assert r.returncode == 1, r.stdout + r.stderr
    for text in named:
        assert text in r.stderr, (text, r.stderr)

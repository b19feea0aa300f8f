"""bench/gpu_check.py --bridge measures the production weight-sync path on a GPU node; its --tiny
form runs the same code here (gloo, CPU) so the script works before it travels."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_bridge_mode_syncs_exactly_on_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--tiny", "--bridge"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["bench"] == "weight_sync_bridge" and line["transport"] == "gloo" and line["exact"] is True
    assert line["bytes"] > 16 * 2**20 and line["receive_buffers_allocated_max"] <= 3

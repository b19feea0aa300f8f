"""Rehearse a layout through submitit before the real run: form every group, run one collective
in each and write a membership report (each rank's node, GPU and groups).

    python jobs/rehearse.py [CONFIG] [--dry-run] [--wait]      # e.g. configs/tulu3-405b-rlvr.yaml

Without CONFIG it rehearses the embedded 4-node tiny layout.
"""

import sys
from pathlib import Path

from tulu.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu-rehearse.yaml"

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        args = [str(CONFIG), *args]
    sys.exit(main(["rehearse", *args]))

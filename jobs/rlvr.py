"""Submit the RLVR stage to Slurm through submitit. Copy this file and edit CONFIG for your run.

    python jobs/rlvr.py [CONFIG] [--dry-run] [--set key=value ...] [--wait]

Without CONFIG it submits the embedded tiny CPU run. `tulu submit` validates the config,
plans the ranks (refusing what will not fit) and submits one allocation with submitit.
"""

import sys
from pathlib import Path

from tulu.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu-rlvr.yaml"

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        args = [str(CONFIG), *args]
    sys.exit(main(["submit", *args]))

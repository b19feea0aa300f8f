"""Submit a RLVR job through submitit: `python jobs/rlvr.py [CONFIG] [--dry-run] [--set key=value] [--wait]`.
Default config: configs/tiny-cpu-rlvr.yaml (the embedded tiny CPU run)."""

import sys

from _entry import submit

if __name__ == "__main__":
    sys.exit(submit("tiny-cpu-rlvr.yaml", sys.argv[1:]))

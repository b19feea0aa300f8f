"""Submit a DPO job through submitit: `python jobs/dpo.py [CONFIG] [--dry-run] [--set key=value] [--wait]`.
Default config: configs/tiny-cpu-dpo.yaml (the embedded tiny CPU run)."""

import sys

from _entry import submit

if __name__ == "__main__":
    sys.exit(submit("tiny-cpu-dpo.yaml", sys.argv[1:]))

"""Submit a SFT job through submitit: `python jobs/sft.py [CONFIG] [--dry-run] [--set key=value] [--wait]`.
Default config: configs/tiny-cpu-sft.yaml (the embedded tiny CPU run)."""

import sys

from _entry import submit

if __name__ == "__main__":
    sys.exit(submit("tiny-cpu-sft.yaml", sys.argv[1:]))

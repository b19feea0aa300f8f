"""Rehearse a layout through submitit: form every group, run one collective in each, write a
membership report. `python jobs/rehearse.py [CONFIG] [--dry-run] [--wait]`, e.g. with
configs/tulu3-405b-rlvr.yaml before the real run."""

import sys

from _entry import submit

if __name__ == "__main__":
    sys.exit(submit("tiny-cpu-rehearse.yaml", sys.argv[1:], mode="rehearse"))

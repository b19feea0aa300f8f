"""Submit any config through submitit: `python jobs/submit.py CONFIG [--dry-run] [--mode M] [--set k=v] [--wait]`."""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))

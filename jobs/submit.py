"""Submit any job config through submitit (the same as `tulu submit`).

    python jobs/submit.py CONFIG [--dry-run] [--mode train|rehearse|counter] [--set key=value ...] [--wait]
"""

import sys

from tulu.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))

"""Pid 1 of an isolated local Slurm node (slurm/local/start.sh --isolate-nodes).

    unshare --pid --fork --mount-proc python3 node_init.py slurmd -D -N n2 -f slurm.conf

Runs the command as its child, reaps every orphan the namespace hands it (job steps'
processes are re-parented here when slurmstepd exits), forwards TERM/INT/HUP to the command,
and exits with its status: the kernel then kills what is left in the namespace.
"""

import os
import signal
import sys

child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda s, _f: os.kill(child, s))
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(0)
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)

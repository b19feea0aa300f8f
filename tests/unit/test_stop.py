import os
import signal
import subprocess
import sys
import time

from tulu.launch.stop import StopRequest


def test_warning_signal_is_seen_at_the_next_poll_and_does_not_kill_children():
    stop = StopRequest().install()
    try:
        # A child started after install inherits the blocked mask: the warning must not kill it
        # (it killed Megatron's checkpoint writers before).
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
        time.sleep(0.5)
        os.kill(child.pid, signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        # A thread started before install (pytest has some) may take the signal; then the
        # handler runs on the main thread's next bytecode boundary rather than at the poll.
        deadline = time.time() + 5
        while not stop.requested and time.time() < deadline:
            time.sleep(0.01)
        assert stop.requested is True
        assert stop.signal_name == "SIGUSR2"
        assert child.wait(timeout=10) == 0
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_no_signal_means_no_stop():
    stop = StopRequest().install()
    try:
        assert stop.requested is False
        assert stop.agree() is False
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)

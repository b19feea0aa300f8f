"""Test-only verifiers that misbehave on purpose; imported by scorer workers via ``plugins=``."""

import os
import time

from tulu.rewards.verifier import Verifier, register_verifier


class SleepVerifier(Verifier):
    """Sleeps ``ground_truth`` seconds (a stuck verifier), then verifies."""

    name = "test-sleep"

    def verify(self, completion: str, ground_truth: str) -> bool:
        time.sleep(float(ground_truth))
        return True


class CrashVerifier(Verifier):
    """Kills its own process, as a segfault in a C extension would."""

    name = "test-crash"

    def verify(self, completion: str, ground_truth: str) -> bool:
        os._exit(3)


class HogVerifier(Verifier):
    """Allocates memory without bound."""

    name = "test-hog"

    def verify(self, completion: str, ground_truth: str) -> bool:
        hoard = []
        while True:
            hoard.append(bytearray(64 << 20))


for _v in (SleepVerifier(), CrashVerifier(), HogVerifier()):
    register_verifier(_v, replace=True)

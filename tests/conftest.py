"""Shared test settings.

Tiny models gain nothing from intra-op threads, and on a busy 2-core machine torch's
thread pool makes every op wait for a descheduled sibling: one thread is both faster
and steadier. Subprocesses started by tests inherit OMP_NUM_THREADS=1 for the same reason.
"""

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Processes a test started (each in its own session): whatever a failed test left
    is killed with its whole group, p2pd included."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

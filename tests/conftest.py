"""Shared test settings.

Tiny models gain nothing from intra-op threads, and on a busy 2-core machine torch's
thread pool makes every op wait for a descheduled sibling: one thread is both faster
and steadier. Subprocesses started by tests inherit OMP_NUM_THREADS=1 for the same reason.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

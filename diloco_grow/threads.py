"""How many torch intra-op threads a process uses, chosen on purpose.

torch's default is one thread per core for every process. The models here are small:
a matmul is over before a thread pool pays off, and two processes that each take every
core make each op wait for a descheduled sibling (two `simulate` runs side by side took
9-12 minutes each for a job of under 2 minutes alone). So the default divides the cores
this process may use by the workers it runs; `--threads N` overrides, and so does an
explicit OMP_NUM_THREADS (launchers such as `demo` and the tests set it for children).
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads(workers: int = 1, cores: int | None = None) -> int:
    """Threads for a process running `workers` models: the cores shared among them.

    In `simulate` the M workers take turns, but on a machine that also runs other jobs
    the share per worker, not the whole machine, is what keeps everyone fast."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, workers))


def set_threads(requested: int | None, workers: int = 1) -> int:
    """Set torch's intra-op threads: `requested` if > 0, else default_threads(workers).
    Returns the number set."""
    if requested is not None and requested < 0:
        raise ValueError(f"threads must be >= 0 (0: automatic), got {requested}")
    n = requested if requested else default_threads(workers)
    torch.set_num_threads(n)
    return n

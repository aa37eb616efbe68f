"""Two-process helpers for the tests that check a distributed run against a single process."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as tdist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a CPU (gloo) process group; one thread per process so two fit the 2-core CI machine."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)


def leave_gloo() -> None:
    """End a test worker as instdisc's own processes end (`dist.leave`): wait for the other rank,
    flush, and exit without interpreter teardown, where gloo's destructors can abort (SIGABRT seen
    in CI) after the test's work is done and written."""
    import sys

    tdist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

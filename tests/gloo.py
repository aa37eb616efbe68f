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

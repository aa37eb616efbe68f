"""One preparer per node: under torchrun (or srun), a data set is decoded and cached once per machine.

Without this every process of a node would decode the same source into the same cache entries at
the same time (eight times the work on an eight-GPU node, and a race on the cache files). With
it, the first rank of each host opens the source (decoding, caching, listing) while the host's
other ranks wait; they then open it themselves, which for a small-image source is a cache hit (a
memory map, milliseconds). A failure of any preparer reaches every rank as the same `DataError`
(exit 2, naming the bad file), instead of leaving the waiting ranks blocked until the collective
timeout.

The wait is a gloo collective of its own with a long timeout (`WAIT_TIMEOUT_S`): decoding a large
small-image source can take longer than ``--dist-timeout``, and a preparer that dies outright is
noticed sooner anyway (its connection drops; torchrun stops the others).
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as tdist

from instdisc import dist
from instdisc.errors import DataError

__all__ = ["WAIT_TIMEOUT_S", "once_per_node"]

T = TypeVar("T")

WAIT_TIMEOUT_S = 6 * 3600
"""How long the other ranks of a node wait for its preparer (a slow decode is not a dead peer)."""


def _gather(obj: object, group: tdist.ProcessGroup) -> list:
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj, group=group)
    return out


def once_per_node(open_fn: Callable[[], T]) -> T:
    """``open_fn()`` run first by one process per host (the lowest rank there), then by the others.

    Every rank must call this at the same point (it is a collective). Not distributed: just
    ``open_fn()``. Hosts are told apart by name, so it needs nothing from the launcher; ranks of a
    host share its disk, hence the cache the preparer wrote.

    Raises:
        What ``open_fn`` raised, on the preparer that failed; `DataError` with its message on
        every other rank (of every node: a node that went on alone would hang in the first
        training collective).
    """
    if dist.world_size() == 1:
        return open_fn()
    group = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=WAIT_TIMEOUT_S))
    try:
        hosts = _gather(socket.gethostname(), group)
        me = tdist.get_rank()
        preparer = hosts.index(hosts[me]) == me
        result: T | None = None
        failure: Exception | None = None
        if preparer:
            try:
                result = open_fn()
            except Exception as e:  # any failure: the waiting ranks must hear of it, then re-raise
                failure = e
        errors = _gather(None if failure is None else (str(failure) or type(failure).__name__), group)
    finally:
        tdist.destroy_process_group(group)
    if failure is not None:
        raise failure
    for rank, message in enumerate(errors):
        if message is not None:
            raise DataError(f"{message} (found by rank {rank}, which prepares the data of its node; every rank stops.)")
    return result if preparer else open_fn()  # type: ignore[return-value]

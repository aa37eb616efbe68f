"""Two nodes on one machine (loopback): one `torchrun --nnodes 2` launch per node, one process each.

The whole scenario (a node SIGKILLed mid-epoch, the other exiting within --dist-timeout, both
relaunched with `--resume auto`, the end state bit-identical to an uninterrupted run, for NPID and
MoCo) takes minutes: it is benchmarks/multinode_loopback.py, with its result in docs/benchmarks.md.
Here: one uninterrupted two-node run, the harness's own checks, and the normal-exit path.
"""

import runpy
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]
pytest.importorskip("torch.distributed.run")
if not sys.platform.startswith("linux"):
    pytest.skip("finds the processes of a launch in /proc", allow_module_level=True)

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "multinode_loopback.py"))


def test_two_nodes_finish_together_even_if_a_rank_aborts_in_its_teardown(tmp_path):
    """A finished distributed run leaves without the interpreter's teardown (whose gloo destructors
    can SIGABRT): here rank 1's teardown aborts for sure, yet both nodes exit 0 at once. Before,
    node 1 failed and node 0's torchrun then waited 5 minutes for it in its exit barrier. The MoCo
    queue is identical on both ranks at every checkpoint."""
    out, _ = BENCH["reference_run"](tmp_path, "moco", 20.0, abort_at_exit=1, limit=60, flags=("--epochs", "1"))
    assert (out / "checkpoints" / "last.pt").exists()


def test_checkpoint_differences_are_found():
    import torch

    a = {"model": {"w": torch.zeros(3)}, "state": {"step": 4}, "rng": [torch.ones(2)]}
    same = {"model": {"w": torch.zeros(3)}, "state": {"step": 4}, "rng": [torch.ones(2)]}
    assert BENCH["differences"](a, same) == []
    b = {"model": {"w": torch.tensor([0.0, 0.0, 1e-30])}, "state": {"step": 5}, "rng": [torch.ones(2, dtype=torch.float64)]}
    assert BENCH["differences"](a, b) == ["/model/w", "/state/step", "/rng[0]"]

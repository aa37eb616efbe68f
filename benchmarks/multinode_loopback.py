"""Two nodes on one machine: a node killed mid-epoch, both relaunched, the end state bit-identical.

Each "node" is its own `torchrun --nnodes 2 --node-rank R --nproc-per-node 1` launch on 127.0.0.1,
as on two machines. For each method (NPID: memory bank, MoCo: queue):

1. reference: an uninterrupted two-node run; every rank's buffers (bank, queue) are recorded at
   each checkpoint and must be identical across ranks;
2. the same command (`--resume auto`) in a fresh folder; once a checkpoint exists and the run is
   mid-epoch, one node is SIGKILLed whole (its torchrun agent and its worker, which torchrun runs
   in a session of its own); the other node must exit, non-zero, within --dist-timeout + a margin;
3. both nodes relaunched with the same command; the final checkpoint must equal the reference's
   (torch.equal on every tensor, == on everything else but the run folder's path).

Every process started is killed at the end whatever happens (each carries a tag in its
environment, found again in /proc even after its parent died), and every wait has a timeout.

usage: python benchmarks/multinode_loopback.py [--methods npid moco] [--victim 0 1] [--out DIR]
Inside a launch this file is also torchrun's entry: `multinode_loopback.py --worker train ...` runs
`instdisc train` and writes the rank's buffers to $MULTINODE_BUFFERS/rankR.pt at each checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

STEPS_PER_EPOCH = 8  # synthetic:128 at --batch-size 16
COMMON = [
    "--data", "synthetic:128", "--epochs", "3", "--batch-size", "16", "--width", "4", "--image-size", "16",
    "--aug-size", "16", "--knn-every", "0", "--knn-k", "20", "--device", "cpu", "--no-progress",
    "--log-every", "1", "--ckpt-every-steps", "3", "--milestones", "2", "--seed", "0",
]
METHOD_ARGS = {"npid": ["--nce-k", "16"], "moco": ["--moco-k", "32"]}
KILL_AT_STEP = 10  # epoch 2, step 2 of 8: after the checkpoints of steps 3, 6, 8 and 9
EXIT_MARGIN_S = 30.0  # the survivor's allowance beyond --dist-timeout (its own teardown, torchrun's)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment holds MULTINODE_TAG=tag (ours only: the tag is fresh)."""
    needle = f"MULTINODE_TAG={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone, or not ours
            continue
    return pids


def kill_tagged(tag: str) -> None:
    for pid in tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Node:
    """One `torchrun` launch (one node of two) and every process it starts."""

    def __init__(self, rank: int, port: int, out: Path, method: str, timeout: float, log: Path,
                 extra: dict[str, str] | None = None, flags: tuple[str, ...] = ()) -> None:
        self.rank, self.log = rank, log
        self.tag = f"{uuid.uuid4().hex}-node{rank}"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
            "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
            str(Path(__file__).resolve()), "--worker", "train", "--method", method, "--out", str(out),
            "--resume", "auto", "--dist-timeout", f"{timeout:g}", *COMMON, *METHOD_ARGS[method], *flags,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", MULTINODE_TAG=self.tag,
                   MULTINODE_BUFFERS=str(out.parent / f"{out.name}.buffers"), **(extra or {}))
        self.started = time.monotonic()
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL the node whole, as a machine that loses power: the agent and its worker."""
        kill_tagged(self.tag)

    def wait(self, timeout: float) -> int | None:
        """The agent's exit status, or None if it is still running after `timeout` seconds."""
        try:
            return self.proc.wait(timeout=max(timeout, 0.01))
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        kill_tagged(self.tag)
        self.proc.kill()
        self.wait(10)


def launch(out: Path, method: str, timeout: float, logs: Path, name: str,
           extra: dict[str, str] | None = None, flags: tuple[str, ...] = ()) -> list[Node]:
    port = free_port()
    nodes: list[Node] = []
    try:
        for r in (0, 1):
            nodes.append(Node(r, port, out, method, timeout, logs / f"{name}.node{r}.log", extra, flags))
    except BaseException:
        for n in nodes:
            n.close()
        raise
    return nodes


def wait_all(nodes: list[Node], timeout: float) -> list[int | None]:
    end = time.monotonic() + timeout
    return [n.wait(end - time.monotonic()) for n in nodes]


def steps_logged(out: Path) -> int:
    """The last training step rank 0 has logged (metrics.jsonl, one line per step here)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}") and '"type": "step"' in x]
    return max(steps, default=0)


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two checkpoints differ: torch.equal on tensors, == on the rest."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def end_state(out: Path) -> dict[str, Any]:
    import torch

    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    ck["config"]["run"].pop("out")  # the one field that names the folder
    return ck


def rank_buffers(out: Path) -> list[dict[str, Any]]:
    import torch

    return [torch.load(out.parent / f"{out.name}.buffers" / f"rank{r}.pt") for r in (0, 1)]


def check_ranks_agree(out: Path, shared: str) -> None:
    """Both ranks' last recorded buffers are identical, and hold the method's shared state."""
    import torch

    b0, b1 = rank_buffers(out)
    assert b0.keys() == b1.keys() and any(shared in k for k in b0), sorted(b0)
    bad = [k for k in b0 if not torch.equal(b0[k], b1[k])]
    assert not bad, f"buffers differ across ranks: {bad}"


SHARED = {"npid": "bank", "moco": "queue"}


def reference_run(root: Path, method: str, timeout: float, *, abort_at_exit: int | None = None,
                  limit: float = 300, flags: tuple[str, ...] = ()) -> tuple[Path, float]:
    """The uninterrupted run. abort_at_exit: that rank's interpreter aborts in its teardown (as gloo's
    destructors can), which must not reach the exit status of a run whose work is done. flags: more
    `instdisc train` flags (later ones win)."""
    out = root / f"{method}-ref"
    extra = {} if abort_at_exit is None else {"MULTINODE_ABORT_AT_EXIT": str(abort_at_exit)}
    nodes = launch(out, method, timeout, root, f"{method}-ref", extra, flags)
    try:
        t0 = time.monotonic()
        codes = wait_all(nodes, limit)
        took = time.monotonic() - t0
        assert codes == [0, 0], f"reference run: exit codes {codes}\n" + "\n".join(tail(n.log) for n in nodes)
    finally:
        for n in nodes:
            n.close()
    check_ranks_agree(out, SHARED[method])
    return out, took


def killed_run(root: Path, method: str, victim: int, timeout: float) -> dict[str, Any]:
    """Kill node `victim` mid-epoch, time the survivor's exit, relaunch both; return the figures."""
    out = root / f"{method}-kill{victim}"
    result: dict[str, Any] = {"method": method, "victim": victim}
    nodes = launch(out, method, timeout, root, f"{method}-kill{victim}")
    try:
        end = time.monotonic() + 300
        while steps_logged(out) < KILL_AT_STEP:
            if time.monotonic() > end or any(n.proc.poll() is not None for n in nodes):
                raise AssertionError("the run ended or stalled before the kill:\n" + tail(nodes[0].log))
            time.sleep(0.01)
        assert (out / "checkpoints" / "last.pt").exists()
        nodes[victim].kill()
        killed = time.monotonic()
        result["killed_after_step"] = steps_logged(out)
        survivor = nodes[1 - victim]
        code = survivor.wait(timeout + EXIT_MARGIN_S)
        result["survivor_exit_s"] = round(time.monotonic() - killed, 2)
        result["survivor_code"] = code
        assert code is not None, (f"node {1 - victim} still running {timeout + EXIT_MARGIN_S:g} s after node "
                                  f"{victim} was killed:\n" + tail(survivor.log))
        assert code != 0, tail(survivor.log)
        assert not tagged_pids(survivor.tag), "the survivor's worker outlived its agent"
    finally:
        for n in nodes:
            n.close()
    nodes = launch(out, method, timeout, root, f"{method}-kill{victim}-again")
    try:
        codes = wait_all(nodes, 300)
        assert codes == [0, 0], f"relaunch: exit codes {codes}\n" + "\n".join(tail(n.log) for n in nodes)
    finally:
        for n in nodes:
            n.close()
    resumed = [x for x in nodes[0].log.read_text().splitlines() if "resuming at" in x]
    assert resumed, tail(nodes[0].log)
    result["resumed_at"] = resumed[0].rsplit("resuming at ", 1)[1]
    check_ranks_agree(out, SHARED[method])
    return result


def run(methods: list[str], victims: list[int], root: Path, timeout: float = 20.0) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        ref, took = reference_run(root, method, timeout)
        reference = end_state(ref)
        for victim in victims:
            row = killed_run(root, method, victim, timeout)
            diff = differences(reference, end_state(root / f"{method}-kill{victim}"))
            assert not diff, f"{method}: the resumed run's end state differs from the reference at {diff[:10]}"
            rows.append({**row, "reference_s": round(took, 1), "identical": True})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _worker(argv: list[str]) -> int:
    """torchrun's entry: `instdisc` itself, recording this rank's buffers at each checkpoint (the
    engine compares the ranks by a checksum only)."""
    import torch

    from instdisc import dist
    from instdisc.cli import main

    if os.environ.get("MULTINODE_ABORT_AT_EXIT") == os.environ.get("RANK"):
        import atexit

        atexit.register(os.abort)  # SIGABRT in the interpreter's teardown
    folder = Path(os.environ["MULTINODE_BUFFERS"])
    folder.mkdir(parents=True, exist_ok=True)
    agree = dist.buffers_agree

    def recording(module: torch.nn.Module) -> bool:
        path = folder / f"rank{dist.rank()}.pt"
        torch.save({k: b.detach().clone() for k, b in module.named_buffers()}, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
        return agree(module)

    dist.buffers_agree = recording
    return main(argv)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return _worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["npid", "moco"], choices=sorted(METHOD_ARGS))
    p.add_argument("--victim", nargs="+", type=int, default=[1, 0], choices=[0, 1], help="node(s) to kill")
    p.add_argument("--dist-timeout", type=float, default=20.0)
    p.add_argument("--out", help="folder for the runs and logs (default: a temporary one)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        run(a.methods, a.victim, root, a.dist_timeout)
        print(f"all identical; {time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())

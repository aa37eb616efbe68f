"""Distributed helpers that also work in a single process.

The same command runs on a laptop CPU, one GPU, or many processes under `torchrun`: we read
`RANK`/`WORLD_SIZE`/`LOCAL_RANK` from the environment (or, under `srun` without torchrun, SLURM's
`SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`) and fall back to one process when they are absent.
Every helper here is a no-op (or the identity) when not distributed, so method code can call
`all_gather_cat` unconditionally right where it mutates shared state.
"""

from __future__ import annotations

import datetime
import inspect
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device = "auto", *, local_rank: int = 0) -> torch.device:
    """--device -> a torch.device that exists on this machine (the one place that decides).

    "auto" is CUDA when available, else CPU; "cuda" is the process's own GPU under torchrun
    (LOCAL_RANK modulo the GPUs). Anything else that torch cannot use here (no CUDA, a GPU index
    beyond the count, a misspelt name) is a UserError naming the flag, not a torch traceback.
    """
    from instdisc.errors import UserError

    text = str(device).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N; got {str(device)!r}.") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N; got {str(device)!r}.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"--device {device}: CUDA is not available ({why}); use --device cpu (or auto).")
        count = torch.cuda.device_count()
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(count, 1))
        elif dev.index >= count:
            raise UserError(f"--device {device}: this machine has {count} GPU(s) (cuda:0 .. cuda:{count - 1}).")
    return dev


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "gpu[07-09,12],cpu3" -> "gpu07" (zero padding kept)."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):  # the first item ends at a comma outside brackets
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())


def slurm_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) of a process
    that `srun` started without torchrun, from SLURM's; {} when this is not such a process.

    Only a job step counts (SLURM_STEP_ID is set): an sbatch script's own shell also carries
    SLURM_PROCID=0 and the allocation's SLURM_NTASKS, and a command run there is one process.
    Ranks: SLURM_PROCID of SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), local rank SLURM_LOCALID.
    MASTER_ADDR and MASTER_PORT keep the values the environment gives them; else the first host of
    the step's node list (rank 0 runs there: srun places tasks in node-list order) and the port
    20000 + SLURM_JOB_ID mod 20000, so that two jobs sharing a node do not collide.
    """
    from instdisc.errors import UserError

    if "SLURM_STEP_ID" not in environ and "SLURM_STEPID" not in environ:
        return {}

    def number(*names: str) -> int:
        for name in names:
            if name in environ:
                try:
                    return int(environ[name])
                except ValueError:
                    raise UserError(f"${name} must be an integer; got {environ[name]!r}.") from None
        raise UserError(f"started by srun, but ${names[0]} is not set: cannot tell this process's rank.")

    world = number("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if world < 1:
        name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
        raise UserError(f"${name} must be a number of tasks >= 1; got {environ[name]!r}.")
    if world == 1:
        return {}
    rank = number("SLURM_PROCID")
    if not 0 <= rank < world:  # a rank outside the step would wait for peers that never come
        raise UserError(f"$SLURM_PROCID {rank} is not a rank of this step's {world} tasks (0 to {world - 1}).")
    local = number("SLURM_LOCALID")
    if local < 0:
        raise UserError(f"$SLURM_LOCALID must be >= 0; got {local}.")
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}
    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodes:
            raise UserError("started by srun with several tasks, but neither $MASTER_ADDR nor a SLURM node list "
                            "is set: export MASTER_ADDR (rank 0's host) in the job script.")
        addr = _first_host(nodes)
    out["MASTER_ADDR"] = addr
    out["MASTER_PORT"] = environ.get("MASTER_PORT") or str(20000 + number("SLURM_JOB_ID", "SLURM_JOBID") % 20000)
    return out


def launch_ranks(environ: Mapping[str, str]) -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) of this process from torchrun's variables (1 process when
    absent), checked: a value that is not an integer, a rank outside the world, or a several-process
    world without its rendezvous (MASTER_ADDR, MASTER_PORT) is a UserError naming the variable,
    never a traceback from int() or a wait for peers that never come."""
    from instdisc.errors import UserError

    def number(name: str, default: int, low: int) -> int:
        raw = environ.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise UserError(f"${name} must be an integer; got {raw!r}.") from None
        if value < low:
            raise UserError(f"${name} must be >= {low}; got {raw!r}.")
        return value

    world = number("WORLD_SIZE", 1, 1)
    rank = number("RANK", 0, 0)
    local = number("LOCAL_RANK", 0, 0)
    if rank >= world:
        raise UserError(f"$RANK {rank} is not a rank of $WORLD_SIZE {world} processes (0 to {world - 1}).")
    if world > 1:
        missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not environ.get(n)]
        if missing:
            raise UserError(f"$WORLD_SIZE is {world}, but ${', $'.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                            "not set: launch with torchrun (or srun), which sets them, or unset $WORLD_SIZE.")
        port = environ["MASTER_PORT"]
        if not (port.isdigit() and 0 < int(port) < 65536):
            raise UserError(f"$MASTER_PORT must be a port number (1 to 65535); got {port!r}.")
    return rank, world, local


def init_from_env(device: str = "auto", timeout_s: float = 600.0) -> Env:
    """Initialise torch.distributed if launched by torchrun (or by srun alone: `slurm_env`), and
    pick the device.

    Args:
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
        timeout_s: collective timeout. A rank that dies makes the others fail after this long
            instead of hanging forever.
    """
    if "RANK" not in os.environ:  # torchrun's variables win; else srun's, translated
        os.environ.update(slurm_env(os.environ))
    rank, world, local = launch_ranks(os.environ)
    dev = resolve_device(device, local_rank=local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        global _joined
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=dev if dev.type == "cuda" else None
        )
        _joined = True
    return Env(rank=rank, world_size=world, local_rank=local, device=dev)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only (instead of monkey-patching builtins.print)."""
    if is_main():
        kwargs.setdefault("file", sys.stdout)
        print(*args, **kwargs, flush=True)


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, in rank order. No gradient flows.

    All ranks must pass the same shape (the training loader guarantees equal per-rank batches).
    """
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def shard_range(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of n items: ceil(n / world) each, the last ranks' shorter or
    empty. The shares in rank order are range(n) (what embedding and kNN scoring split by)."""
    shard = -(-n // world)
    return range(min(rank * shard, n), min((rank + 1) * shard, n))


class _AllGatherGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank's loss depends on this rank's rows: their gradient is the sum over ranks.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // world_size()
        return grad[rank() * n : (rank() + 1) * n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`all_gather_cat` through which gradients flow back to each rank's own slice.

    For losses whose negatives come from the global batch (SimCLR). Each rank computes the loss of
    its *own* rows against the gathered ones; the backward pass sums, over ranks, the gradient with
    respect to this rank's rows. With DDP's gradient averaging the result is the gradient of the
    mean loss over the global batch, i.e. what one process holding the whole batch would compute.
    The identity (with gradient) when not distributed. All ranks must pass the same shape.
    """
    if world_size() == 1:
        return x
    return _AllGatherGrad.apply(x)


def all_gather_object(obj: object) -> list:
    """Every rank's picklable `obj`, in rank order; `[obj]` when not distributed."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def all_reduce_(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum", "mean" or "max"); identity when not distributed."""
    if world_size() == 1:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        x /= world_size()
    return x


def ddp(module: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """Wrap `module` for gradient all-reduce only, without DDP's per-forward buffer broadcast: a
    rank's bank/queue/labels change inside its forward and the methods keep them equal with their
    own collectives (broadcast once with `broadcast_buffers` before wrapping). Newer torch renamed
    the switch and warns about the old one; both mean the same here."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    ids = [device.index] if device is not None and device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, **no_sync)


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of `module` from rank `src` to all ranks.

    Whether DDP syncs buffers at construction depends on the torch version and on which switch
    turned its per-forward buffer broadcast off; we do it explicitly after building the model and
    after resuming, so it holds everywhere.
    """
    if world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def sync_norm_stats(module: torch.nn.Module, src: int = 0) -> None:
    """Broadcast BatchNorm running statistics from rank `src`.

    Without DDP's per-forward buffer broadcast every rank keeps its own running stats (they only matter in eval
    mode); syncing them before evaluation and checkpoints gives every rank rank 0's model, as DDP's
    default buffer broadcast would.
    """
    if world_size() == 1:
        return
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            for b in m.buffers():
                dist.broadcast(b, src)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


_joined = False  # whether init_from_env made this process join a process group


def cleanup(*, wait_for_peers: bool = True, destroy: bool = True) -> None:
    """Leave the process group. After success all ranks meet at a barrier first, so that every
    rank's work is done before any leaves. After an error we do not wait (the peers may be gone).

    destroy=False keeps the group for a process that ends with `leave` (the CLI): tearing it down
    is one of the hazards that `leave` avoids.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if wait_for_peers:
                dist.barrier()
        finally:
            if destroy:
                dist.destroy_process_group()


def joined() -> bool:
    """Whether this process joined a process group in `init_from_env` (even one since destroyed)."""
    return _joined


def leave(status: int) -> NoReturn:
    """End a process of a distributed run now, with `status`, without the interpreter's teardown.

    At interpreter exit gloo's and c10d's C++ objects are destroyed while the peers close their
    connections at the same moment; a thread still joinable there aborts the process (SIGABRT,
    "terminate called without an active exception"). That turned finished runs into failures, and
    torchrun's agent of the other node, whose worker had succeeded, then waited for this one in its
    exit barrier (5 minutes) instead of exiting. Nothing is lost by skipping the teardown: a
    checkpoint is fsynced and renamed into place before the save returns, metric lines are written
    and closed one by one, the run-folder lock is a flock the kernel drops, and the streams are
    flushed here. Call it only once the work is done or has failed (after `cleanup`).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(status)


@torch.no_grad()
def buffers_agree(module: torch.nn.Module) -> bool:
    """True if every rank holds bit-identical buffers (memory banks, queues, labels, Z).

    Compares a float64 checksum per buffer across ranks: one small all-gather, cheap enough to
    run at every checkpoint, and it catches the silent per-rank drift seen in older NPID code.
    """
    if world_size() == 1:
        return True
    sums = [b.double().sum() + (b.double() * torch.arange(b.numel(), device=b.device).view_as(b).remainder(7)).sum()
            for b in module.buffers() if b.numel()]
    if not sums:
        return True
    local = torch.stack(sums).nan_to_num(nan=1.2345e300)  # (num_buffers,) NaN == NaN for this check
    everyone = all_gather_cat(local[None])  # (world, num_buffers)
    return bool((everyone == everyone[0]).all())

"""The run directory: everything a training leaves on disk besides the weights, and how a launch
finds its way back into it.

RUN_DIR holds config.json, metrics.jsonl (`MetricLog`), checkpoints/ (`instdisc.checkpoint`
writes them atomically) and a lock (`RunLock`). A checkpoint records the loop's position
(`TrainState`), every rank's global random generators (`rng_state`) and a fingerprint of the
epoch's data order (`order_fingerprint`); `restore_training` and `restore_order_and_rng` put them
back, after `check_resume_epochs` and `check_same_data` have refused a resume that would not
continue the same run. `resume_auto` and `prepare_run_dir` decide what a launch does with the
folder it is given. The training loop (`instdisc.engine`) only calls these.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from instdisc import __version__, dist
from instdisc.checkpoint import LAST, PREV, atomic_write_text, checkpoint_dir, save_checkpoint
from instdisc.config import TrainConfig, absolute_paths, resume_rules
from instdisc.dist import Env
from instdisc.errors import CheckpointError, DataError, InstdiscWarning, UserError
from instdisc.loggers import Logger, numeric
from instdisc.quality import QualityState
from instdisc.runtime import load_optimizer_state
from instdisc.sources import ImageSet
from instdisc.sources.fingerprint import difference as fingerprint_difference


class MetricLog:
    """Appends JSON lines to RUN_DIR/metrics.jsonl (rank 0 only), and mirrors every numeric field
    to the run's `--logger`s (`instdisc.loggers`: TensorBoard, wandb, MLflow; tags "step/loss",
    "epoch/knn_top1", ...). The JSONL file stays the record: the loggers are viewers."""

    def __init__(self, path: Path | None, loggers: list[Logger] | None = None) -> None:
        self.path = path
        self.loggers = list(loggers or []) if path is not None else []

    def run_ids(self) -> dict[str, str]:
        """The remote runs' ids, kept in the checkpoint: --resume continues the same runs."""
        return {lg.name: lg.run_id for lg in self.loggers if lg.run_id is not None}

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
        self.loggers = []

    def write(self, **rec: Any) -> None:
        if self.path is None:
            return
        if "step" in rec:
            values = numeric(rec)
            for lg in self.loggers:
                lg.log(values, rec["step"])
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        except OSError as e:
            raise UserError(
                f"could not append to {str(self.path)!r}: {e.strerror or e}. The last checkpoint is intact; "
                "free some space and continue with --resume."
            ) from None

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint (they will be logged again) and a line
        cut short by a kill. Rewritten atomically: a second kill cannot lose the log."""
        if self.path is None or not self.path.exists():
            return
        keep = []
        for ln in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(ln)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                keep.append(ln)
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))


@dataclass
class TrainState:
    epoch: int = 0  # current epoch
    epoch_step: int = 0  # steps already done in the current epoch
    step: int = 0  # global step
    skipped: int = 0  # steps skipped so far for a non-finite loss/gradient (--skip-nonfinite)
    # The current epoch's loss so far (steps not skipped): checkpointed, so that the epoch's mean
    # after a mid-epoch resume still covers the whole epoch.
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global generator of this process, as plain tensors and numbers (weights_only-loadable).

    The loop reseeds torch per step, and augmentation draws from a per-step generator, so these
    matter only for draws outside steps (e.g. an epoch-start hook) and for code that uses numpy's
    or Python's global generators. Restoring them makes a resumed process indistinguishable.
    """
    _, key, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    npst = st["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"]))
    py = st["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def order_fingerprint(order: Tensor) -> int:
    """CRC-32 of an epoch's data order (or of one batch's indices)."""
    return zlib.crc32(order.detach().cpu().to(torch.int64).numpy().tobytes())


LOCK_NAME = ".lock"


class RunLock:
    """An exclusive lock on a run directory for the life of a training process.

    `fcntl.flock` on RUN_DIR/.lock: the kernel drops it when the holder exits, however it exits
    (SIGKILL, OOM, power loss on a local disk), so a lock file left by a killed process is stale by
    construction and the next run takes it over. The file names its holder (pid, host, start time)
    for the refusal message. Where flock does not exist, nothing is locked.
    """

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"{str(self.path.parent)!r} is in use by another training ({holder}): two runs in one folder would "
                "interleave their metrics and checkpoints. Wait for it to finish, stop it, or choose another --out."
            ) from None
        # Ours now, whatever the file said (a killed holder's lock is released by the kernel).
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


# What a launch stopped before its first checkpoint (pre-empted while the data were opened, killed
# in epoch 1) can leave in its run folder; nothing in them is worth keeping.
_BEFORE_FIRST_CHECKPOINT = frozenset({"config.json", "metrics.jsonl", "checkpoints", "debug", LOCK_NAME})


def resume_auto(out: Path) -> bool:
    """``--resume auto``: whether this launch continues the run in `out` (True) or starts it (False).

    Continue when the folder holds a checkpoint (last.pt or prev.pt); start when it is absent, empty,
    or holds only what a launch stopped before its first checkpoint leaves (then started over, as
    with --overwrite). Anything else is not a run: refused, so that a mistyped --out never trains
    into someone's folder. The answer depends on the files alone, so every rank of a torchrun or
    srun launch reads the same one from a shared run folder.
    """
    ckd = checkpoint_dir(out)
    if any((ckd / name).is_file() for name in (LAST, PREV)):
        return True
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, not a run directory.")
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in _BEFORE_FIRST_CHECKPOINT and not p.name.startswith(".write-test-"))
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise UserError(
            f"--resume auto: {str(out)!r} is neither empty nor an instdisc run (it holds {shown}). Give an empty "
            "or new folder as --out, or the folder of the run to continue."
        )
    return False


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Lock the run directory, and refuse to train over another run unless asked to resume or
    overwrite. The caller releases the returned lock when training ends."""
    has_run = (out / "config.json").exists() or checkpoint_dir(out).exists()
    if resume and not has_run:
        raise UserError(f"--resume: {str(out)!r} holds no run to resume.")
    if out.exists() and not out.is_dir():  # else mkdir's "File exists", which names no flag
        raise UserError(f"--out {str(out)!r} is a file, not a run directory; give a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out: cannot write to the run directory {str(out)!r}: {e.strerror or e}.") from None
    lock = RunLock(out)
    lock.acquire()  # before anything is judged or deleted: a running training owns the folder
    try:
        has_run = (out / "config.json").exists() or checkpoint_dir(out).exists()
        if has_run and not (resume or overwrite):
            raise UserError(
                f"{str(out)!r} already holds a run. Pass --resume to continue it, --overwrite to start "
                "over (its checkpoints, metrics and evaluation results are replaced), or choose another --out."
            )
        if overwrite and not resume:
            ckd = checkpoint_dir(out)
            for p in [out / "metrics.jsonl", ckd / "last.pt", ckd / "prev.pt", ckd / "last.pt.damaged"]:
                p.unlink(missing_ok=True)
            for p in (out / "debug").glob("step*-rank*.pt"):
                p.unlink()
            # The old model's results (and cached features) would read as the new model's.
            for p in [*(out / "eval").glob("*.json"), *(out / "eval" / "features").glob("*")]:
                if p.is_file():
                    p.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def read_resume(out: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The run to resume in `out` -> (its TrainConfig, its checkpoint): the one read of the
    checkpoint on ``--resume`` (the CLI needs the run's method and config before it can parse the
    flags; `fit` is handed the same dict). A damaged last.pt is set aside by the launch's rank 0
    only (`checkpoint.load_checkpoint`'s quarantine), as the ranks read the folder together."""
    from instdisc.methods.build import read_run

    launch = os.environ if "RANK" in os.environ else {**os.environ, **dist.slurm_env(os.environ)}
    return read_run(out, quarantine=launch.get("RANK", "0") == "0")


def resume_config(cfg: TrainConfig, stored: TrainConfig, flags: dict[str, Any]) -> TrainConfig:
    """The configuration a ``--resume`` trains with: the run's own (`stored`), with this launch's
    `cfg` where the fields allow it (`config.resume_rules`: "launch" fields always, "change" fields
    when given in `flags`, the "section.name" -> value of this command line). A flag that would
    change anything else (the maths) is refused; so is another --method."""
    absolute_paths(stored)
    rules = resume_rules()
    current, saved = cfg.to_dict(), stored.to_dict()
    if cfg.run.method != stored.run.method:  # the other method's own flags are not comparable
        raise UserError(
            f"--resume: method was {stored.run.method!r} in this run; it cannot change to "
            f"{cfg.run.method!r}. Start a new run (another --out) instead."
        )
    for dest in flags:
        sec, name = dest.split(".", 1)
        if dest not in rules and current[sec][name] != saved[sec][name]:
            raise UserError(
                f"--resume: {name} was {saved[sec][name]!r} in this run; it cannot change to "
                f"{current[sec][name]!r}. Start a new run (another --out) instead."
            )
    for dest, rule in rules.items():
        if rule == "launch" or dest in flags:
            sec, name = dest.split(".", 1)
            setattr(getattr(stored, sec), name, getattr(getattr(cfg, sec), name))
    return stored


def resume_checkpoint(out: Path, ck: dict[str, Any] | None, method: str, epochs: int, *,
                      quarantine: bool) -> dict[str, Any]:
    """The checkpoint a resume continues from (`ck` if the caller read it already, `read_resume`),
    refused if it is another method's or already past --epochs."""
    if ck is None:
        from instdisc.methods.build import read_run

        _, ck = read_run(out, quarantine=quarantine)
    if ck.get("method") != method:
        raise CheckpointError(f"the checkpoint in {str(out)!r} is a {ck.get('method')!r} run, not {method!r}.")
    check_resume_epochs(TrainState(**ck["state"]), epochs)
    return ck


class Checkpointer:
    """Writes the run's checkpoint (`checkpoint.save_checkpoint`: last.pt, the one before as prev.pt):
    everything a ``--resume`` needs to continue bit-identically, from any rank's point of view.

    Every rank calls `save` at the same step (it holds collectives): the ranks' BatchNorm statistics
    are averaged, their method state is checked equal, their generators are gathered; rank 0 writes.
    """

    def __init__(self, out: Path, cfg: TrainConfig, env: Env, method: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, order: Callable[[int], Tensor], data: dict[str, Any],
                 num_samples: int, quality: QualityState, log: MetricLog) -> None:
        self.out, self.cfg, self.env, self.method = out, cfg, env, method
        self.quality, self.log = quality, log  # the signals' neighbour lists; the loggers' remote run ids
        self.optimizer, self.scaler, self.order, self.data, self.num_samples = optimizer, scaler, order, data, num_samples
        self._orders: dict[int, int] = {}  # epoch -> fingerprint of its data order (computed once per epoch)

    def order_crc32(self, epoch: int) -> int:
        if epoch not in self._orders:
            self._orders.clear()
            self._orders[epoch] = order_fingerprint(self.order(epoch))
        return self._orders[epoch]

    def save(self, state: TrainState) -> None:
        dist.sync_norm_stats(self.method)
        if not dist.buffers_agree(self.method):
            raise RuntimeError(f"method state differs across ranks at step {state.step}: this is a bug, please report it")
        rngs = dist.all_gather_object(rng_state(self.env.device))  # one per rank, in rank order
        if self.env.is_main:
            save_checkpoint(self.out, {
                "version": __version__, "method": self.cfg.run.method, "num_samples": self.num_samples,
                "data": self.data, "config": self.cfg.to_dict(), "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "state": dict(state.__dict__),
                "sampler": {"epoch": state.epoch, "position": state.epoch_step,
                            "order_crc32": self.order_crc32(state.epoch)},
                "rng": rngs, "world_size": self.env.world_size,
                "quality": self.quality.state_dict(), "loggers": self.log.run_ids(),
            })
        dist.barrier()


def restore_training(ck: dict[str, Any], optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler) -> TrainState:
    """Load a checkpoint's optimizer and scaler in place (the method comes from
    `methods.build.method_from_checkpoint`, with its weights and buffers); return its loop state."""
    try:
        load_optimizer_state(optimizer, ck["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit this model: {e}") from None
    scaler.load_state_dict(ck["scaler"])
    return TrainState(**ck["state"])


def check_resume_epochs(state: TrainState, epochs: int) -> None:
    """--resume --epochs N on a run already past N would rewrite its config and log, not continue it."""
    done = state.epoch + (state.epoch_step > 0)  # an epoch under way counts as begun
    if done > epochs:
        raise UserError(
            f"--resume --epochs {epochs}: this run is already in epoch {done} (step {state.step}), past {epochs}. "
            f"Resuming cannot shorten a run; give --epochs {done} or more to continue it, or start a new run "
            "(another --out)."
        )


def check_same_data(ck: dict[str, Any], fingerprint: dict[str, Any], train: ImageSet, spec: str) -> None:
    """Refuse to resume on other training images than the checkpoint's (the same ones under
    another path are fine). Checkpoints older than the fingerprint are checked by image count."""
    saved = ck.get("data")
    n = len(train)
    if int(ck.get("num_samples", n)) != n:
        why: str | None = f"it has {n} images now, the run trained on {ck['num_samples']}"
    else:
        why = None if saved is None else fingerprint_difference(saved, fingerprint, train)
    if why:
        raise DataError(
            f"the training set changed: {spec!r} is not the data this run trained on ({why}). Resuming "
            "would not continue the same run: restore the original images, or start a new run (another --out)."
        )


def restore_order_and_rng(ck: dict[str, Any], order_crc32: int, env: Env) -> None:
    """Check the resumed epoch's data order and restore this rank's global random generators."""
    # The data order is a function of (seed, epoch); check that this process regenerates the
    # one the checkpoint was taken with (it would not under, say, another torch's randperm).
    saved_order = (ck.get("sampler") or {}).get("order_crc32")
    if saved_order is not None and saved_order != order_crc32:
        warnings.warn(
            "the data order of this epoch differs from the one the checkpoint was taken with (another "
            "torch version?): the run continues, but not bit-identically to an uninterrupted one.",
            InstdiscWarning, stacklevel=3,
        )
    rngs = ck.get("rng") or []
    if len(rngs) == env.world_size:
        set_rng_state(rngs[env.rank], env.device)
    elif rngs:
        dist.print0(f"note: the checkpoint was taken with {len(rngs)} process(es), this run has "
                    f"{env.world_size}: global random generators start afresh.")

"""Checkpoints: a dict of state_dicts plus the resolved config, written atomically.

Layout: RUN_DIR/checkpoints/last.pt and prev.pt (the one before). Writing goes to a temporary
file in the same folder, is fsync'ed and then renamed over `last.pt` after `last.pt` became
`prev.pt`, so a crash at any instant leaves at least one complete checkpoint. Everything inside
is tensors, numbers, strings, lists and dicts: `torch.load(path, weights_only=True)` reads it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from instdisc.errors import CheckpointError, UserError

FORMAT = 1
LAST, PREV = "last.pt", "prev.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` as the newest checkpoint of the run; keeps the previous one."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    last, prev, tmp = d / LAST, d / PREV, d / f".{LAST}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if last.exists():
            os.replace(last, prev)
        os.replace(tmp, last)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"could not write a checkpoint to {str(d)!r}: {e.strerror or e}. The previous checkpoint "
            "is untouched; free some space or fix the permissions and resume with --resume."
        ) from None
    return last


def _read(path: Path) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, garbage: all mean "unreadable"
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}: {e}).") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT or "config" not in ck or "model" not in ck:
        raise CheckpointError(f"{str(path)!r} is not an instdisc checkpoint.")
    return ck


def find_checkpoint(path: str | Path) -> Path:
    """A run directory, its checkpoints/ folder or a .pt file -> the checkpoint file to read."""
    p = Path(path)
    if p.is_dir():
        d = p if p.name == "checkpoints" else checkpoint_dir(p)
        for name in (LAST, PREV):
            if (d / name).is_file():
                return d / name
        raise UserError(f"no checkpoint in {str(p)!r} (looked for checkpoints/{LAST} and {PREV}).")
    if not p.is_file():
        raise UserError(f"{str(p)!r} is neither a run directory nor a checkpoint file.")
    return p


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint. For a run directory, fall back to prev.pt if last.pt is damaged."""
    p = find_checkpoint(path)
    try:
        return _read(p)
    except CheckpointError:
        prev = p.with_name(PREV)
        if p.name != LAST or not prev.is_file():
            raise
        warnings.warn(f"{str(p)!r} is damaged; resuming from the previous checkpoint {str(prev)!r}.", stacklevel=2)
        return _read(prev)

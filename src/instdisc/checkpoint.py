"""Checkpoints: a dict of state_dicts plus the resolved config, written atomically.

Layout: RUN_DIR/checkpoints/last.pt and prev.pt (the one before). A save writes a temporary file
in the same folder, fsyncs it, turns the current last.pt into prev.pt and renames the temporary
file over last.pt (os.replace, atomic on POSIX), then fsyncs the folder. Where the file system has
hard links, prev.pt is made with a link first, so last.pt exists at every instant; elsewhere there
is a moment with prev.pt only, which `find_checkpoint` handles. A crash or SIGKILL at any instant
therefore leaves at least one complete checkpoint, and a failed write (a full disk) leaves both
untouched. Everything inside is tensors, numbers, strings, lists and dicts:
`torch.load(path, weights_only=True)` reads it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from instdisc.errors import CheckpointError, InstdiscWarning, UserError

FORMAT = 1
LAST, PREV = "last.pt", "prev.pt"
_TMP_PREFIX = f".{LAST}.tmp."
_LINK_PREFIX = f".{PREV}.link."
DAMAGED_SUFFIX = ".damaged"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(d: Path) -> None:
    try:
        dfd = os.open(d, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the renames are still atomic
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def remove_stale_temporaries(d: Path) -> None:
    """Delete temporary files and links left by a writer that was killed mid-save (not ours)."""
    for prefix in (_TMP_PREFIX, _LINK_PREFIX):
        for p in d.glob(f"{prefix}*"):
            if p.name != f"{prefix}{os.getpid()}":
                p.unlink(missing_ok=True)


def _rotate(last: Path, prev: Path) -> None:
    """last.pt -> prev.pt. With a hard link last.pt stays in place until the new one replaces it."""
    if not last.exists():
        return
    link = prev.with_name(f"{_LINK_PREFIX}{os.getpid()}")
    try:
        link.unlink(missing_ok=True)
        os.link(last, link)
        os.replace(link, prev)
    except OSError:  # no hard links here (FAT, some network file systems): plain rename
        link.unlink(missing_ok=True)
        os.replace(last, prev)


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` as the newest checkpoint of the run; keeps the previous one.

    Raises:
        UserError: the write failed (no space, no permission); last.pt and prev.pt are untouched.
    """
    d = checkpoint_dir(run_dir)
    last, prev, tmp = d / LAST, d / PREV, d / f"{_TMP_PREFIX}{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(d)
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _rotate(last, prev)
        os.replace(tmp, last)
        _fsync_dir(d)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write (ENOSPC, EDQUOT, EIO) from its C++ stream writer as a
        # RuntimeError ("unexpected pos ...", "file write failed"), not as the OSError behind it.
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"could not write a checkpoint to {str(d)!r}: {write_failure(e, d)}. The previous checkpoint "
            "is untouched; free some space or fix the permissions and continue with --resume."
        ) from None
    return last


def write_failure(e: BaseException, where: Path) -> str:
    """Why a write into the folder `where` failed, in words: the OSError's own reason, or, for
    torch's RuntimeError (which drops the errno), what the file system says now."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if free is not None and free < 1 << 20:
        return f"no space left on the device ({free:,} bytes free; torch: {first})"
    return f"the write failed (torch: {first})"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """The one way instdisc replaces a file (result files, feature exports, caches, model exports):
    `write(tmp)` writes a temporary file beside `path`, which is flushed to disk and renamed over
    `path` (os.replace, atomic on POSIX). Readers see the old file or the whole new one, never a
    part, and no temporary outlives a failure. The temporary keeps `path`'s suffix (writers such as
    torch.export.save look at it) and is unique per process and call. Errors propagate as they are
    (OSError, or torch's RuntimeError on a full disk); callers word them (`atomic_write_text`)."""
    p = Path(path)
    tmp = p.with_name(f".{p.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{p.suffix}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def write_run_files(run_dir: str | Path, files: dict[str, bytes]) -> list[Path]:
    """Write {path relative to run_dir: content} atomically (folders made); returns the paths.
    What a method's epoch hook saves through `EpochContext.save` (SeLa's pseudo-labels)."""
    written = []
    for rel, data in files.items():
        path = Path(run_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data))
        except OSError as e:
            raise UserError(f"could not write {str(path)!r}: {e.strerror or e}.") from None
        written.append(path)
    return written


def run_files_saver(run_dir: str | Path, *, is_main: bool = True) -> Callable[[dict[str, bytes]], list[Path]]:
    """`EpochContext.save` for a run directory: rank 0 writes (`write_run_files`), other ranks do nothing."""
    return lambda files: write_run_files(run_dir, files) if is_main else []


# What a run directory holds that an output file must never replace: the record of the run.
_RUN_FILES = ("config.json", "metrics.jsonl", "command.json")


def check_out_file(path: str | Path, flag: str = "--out", *, inputs: tuple[str | Path, ...] = ()) -> None:
    """An output file's folder exists (or is made) and takes files: checked before minutes of work,
    not found after them. Refused too: a folder, one of the command's `inputs` (a run's checkpoint
    or released weights read, then replaced by what was made of them), and a run's own files
    (its checkpoints/, config.json, metrics.jsonl), which `--out` would silently destroy."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a folder; give a file name.")
    resolved = target.resolve()
    for given in inputs:
        src = Path(given)
        if resolved == src.resolve() or (src.is_dir() and resolved == (checkpoint_dir(src) / "last.pt").resolve()):
            raise UserError(f"{flag} {str(path)!r} is the file this command reads ({str(given)!r}): it would be "
                            "replaced by its own output. Give another file name.")
    run = resolved.parent.parent if resolved.parent.name == "checkpoints" else resolved.parent
    is_run = (run / "config.json").is_file() or checkpoint_dir(run).is_dir()
    if is_run and resolved.exists() and (resolved.parent.name == "checkpoints" or resolved.name in _RUN_FILES):
        raise UserError(f"{flag} {str(path)!r} is a file of the run {str(run)!r}: writing there would destroy it. "
                        "Give a file name outside the run's checkpoints/ and records.")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag}: cannot write {str(path)!r}: {e.strerror or e} ({str(parent)!r}).") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag}: cannot write {str(path)!r}: the folder {str(parent)!r} is not writable.")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace a small text file (config.json, metrics.jsonl) so that readers never see half of it."""
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise UserError(f"could not write {str(path)!r}: {e.strerror or e}.") from None


def _first_line(e: BaseException) -> str:
    return _first_line_of(str(e))


def _first_line_of(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _read(path: Path) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only messages go on to advise weights_only=False, i.e. running whatever
        # code the file holds: never the right advice for a file that claims to be our checkpoint.
        text = str(e)
        if "Unsupported global" not in text:
            detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
            raise CheckpointError(
                f"checkpoint {str(path)!r} is unreadable (corrupt, or not a PyTorch file: {_first_line_of(detail)})."
            ) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds Python objects besides tensors, numbers and strings, so instdisc did "
            "not write it (or it was altered); it is not loaded, because unpickling such objects can run code. "
            "Released weights of another project are read by `instdisc weights FILE` or as FILE.pth, not as a run."
        ) from None
    except Exception as e:  # truncated zip, garbage, vanished file: all "unreadable"
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}: {_first_line(e)}).") from None
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
    if not p.exists():
        raise UserError(f"{str(p)!r} does not exist: there is no run or checkpoint there.")
    if not p.is_file():
        raise UserError(f"{str(p)!r} is neither a run directory nor a checkpoint file.")
    return p


def load_checkpoint(path: str | Path, *, quarantine: bool = False) -> dict[str, Any]:
    """Read a checkpoint. For a run directory, fall back to prev.pt (with a warning) if last.pt is
    truncated or unreadable.

    Args:
        path: run directory, its checkpoints/ folder, or a checkpoint file.
        quarantine: when falling back, rename the damaged last.pt to last.pt.damaged, so that the
            next save does not rotate it into prev.pt (the run resumes with two good files again).
    """
    p = find_checkpoint(path)
    try:
        return _read(p)
    except CheckpointError as e:
        prev = p.with_name(PREV)
        if p.name != LAST or not prev.is_file():
            raise
        ck = _read(prev)
        note = ""
        if quarantine:
            try:
                os.replace(p, p.with_name(LAST + DAMAGED_SUFFIX))
                note = f" (kept as {LAST + DAMAGED_SUFFIX})"
            except OSError:
                pass
        warnings.warn(
            f"{e} Using the previous checkpoint {str(prev)!r} instead{note}; the steps after it are "
            "repeated, with the same result.",
            InstdiscWarning,
            stacklevel=2,
        )
        return ck

"""Features of a whole image set, in dataset order, and the exported `.npy` files.

Export layout (other tools script against these names):
  FILE.npy          (N, D) float32, row i = dataset index i
  FILE.labels.npy   (N,) int64, where the source has labels
  FILE.meta.json    source, split, checkpoint, method, dims
  FILE.paths.txt    row i's image file (one per line), where the source has files
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from instdisc import dist
from instdisc.augment import CIFAR_MEAN, CIFAR_STD, preprocess
from instdisc.checkpoint import atomic_write, atomic_write_text
from instdisc.errors import UserError
from instdisc.loader import eval_batches
from instdisc.progress import Progress
from instdisc.sources import ImageSet


@torch.no_grad()
def extract_features(
    fn: Callable[[Tensor], Tensor],
    images: ImageSet,
    *,
    size: int,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    workers: int = 4,
    desc: str = "embed",
    progress: bool = False,
    gather: bool = True,
) -> Tensor:
    """Run `fn` over every image (eval transform) -> (N, ...) on `device`, row i = index i.

    Under torchrun each rank embeds one contiguous shard; the shards are padded to equal length,
    all-gathered and trimmed, so every rank gets the full, ordered result. ``gather=False`` returns
    this rank's shard only: rows rank * S .. min((rank + 1) * S, N) - 1 with S = ceil(N / world),
    possibly none, (n_r, ...).
    """
    n, world, rank = len(images), dist.world_size(), dist.rank()
    shard = -(-n // world)  # ceil
    mine = dist.shard_range(n, rank, world)
    lo, hi = mine.start, mine.stop
    outs = []
    bar = Progress(hi - lo, desc=desc, enabled=progress and dist.is_main())
    for x in eval_batches(images, batch_size, start=lo, stop=hi, device=device, workers=workers, size=size):
        outs.append(fn(preprocess(x, size, mean=mean, std=std)).float())
        bar.update(x.shape[0])
    bar.close()
    local = torch.cat(outs) if outs else None
    if world == 1 or (not gather and local is not None):
        assert local is not None
        return local
    # Ranks past the end have no rows; they still need the shape (to join the gather or return (0, ...)).
    if local is None:
        probe = fn(preprocess(next(eval_batches(images, 1, device=device, workers=0, size=size)), size, mean=mean, std=std))
        local = probe.float()[:0]
    if not gather:
        return local
    pad = torch.zeros((shard - local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    gathered = dist.all_gather_cat(torch.cat([local, pad]))  # (world * shard, ...)
    return gathered[:n]


def save_features(
    path: str | Path,
    feats: Tensor,
    labels: np.ndarray | None,
    meta: dict[str, Any],
    paths: Sequence[str] | None = None,
) -> list[Path]:
    """Write FILE.npy (+ FILE.labels.npy, FILE.paths.txt, FILE.meta.json) atomically; returns the
    paths written. ``paths``: the source file of each row (`ImageSet.paths`), one line each."""
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {str(path.parent)!r}: {e.strerror}.") from None
    stem = path.with_suffix("")
    written = []

    def _atomic_npy(p: Path, arr: np.ndarray) -> None:
        try:
            atomic_write(p, lambda tmp: np.save(tmp, arr, allow_pickle=False))
        except OSError as e:
            raise UserError(f"cannot write {str(p)!r}: {e.strerror}.") from None
        written.append(p)

    _atomic_npy(path, feats.detach().cpu().numpy().astype(np.float32))
    if labels is not None:
        _atomic_npy(Path(f"{stem}.labels.npy"), np.asarray(labels, dtype=np.int64))
    if paths is not None:
        if len(paths) != feats.shape[0] or any("\n" in p for p in paths):
            raise UserError(f"cannot write {stem}.paths.txt: {len(paths)} names for {feats.shape[0]} rows, "
                            "or a name with a line break.")
        paths_path = Path(f"{stem}.paths.txt")
        atomic_write_text(paths_path, "".join(f"{p}\n" for p in paths))
        written.append(paths_path)
        meta = {**meta, "paths": paths_path.name}
    meta_path = Path(f"{stem}.meta.json")
    meta_path.write_text(json.dumps({**meta, "shape": list(feats.shape)}, indent=2))
    written.append(meta_path)
    return written


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def load_features(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """Read FILE.npy and FILE.labels.npy if present -> (features (N, D), labels (N,) or None)."""
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise UserError(f"feature file {str(path)!r} {what} (expected an .npy written by `instdisc embed`).")
    try:
        feats = torch.from_numpy(np.load(path, allow_pickle=False)).float()
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty or truncated file
        raise UserError(f"{str(path)!r} is not a readable .npy feature file: {_first_line(e) or 'empty file'}") from None
    if feats.ndim != 2:
        raise UserError(f"{str(path)!r} holds an array of shape {tuple(feats.shape)}; expected (N, D).")
    if feats.shape[0] == 0 or feats.shape[1] == 0:  # else refused later as "k must be >= 1", naming -k
        raise UserError(f"{str(path)!r} holds no features (shape {tuple(feats.shape)}).")
    bad_rows = (~torch.isfinite(feats)).any(dim=1)  # (N,)
    if bool(bad_rows.any()):
        first = int(bad_rows.nonzero()[0])
        raise UserError(
            f"{str(path)!r} holds NaN or infinite values in {int(bad_rows.sum())} of {feats.shape[0]} rows "
            f"(the first is row {first}): no result computed from it could be trusted. Export the features again "
            "(`instdisc embed`) from a model whose weights are finite."
        )
    lab_path = path.with_name(path.name[: -len(".npy")] + ".labels.npy") if path.name.endswith(".npy") else None
    labels = None
    if lab_path is not None and lab_path.is_file():
        try:
            raw = np.load(lab_path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{str(lab_path)!r} is not a readable .npy label file: {_first_line(e) or 'empty file'}") from None
        # float or negative ids would be truncated or index out of range (and vote for the wrong class)
        if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer) or (raw.size and raw.min() < 0):
            raise UserError(f"{str(lab_path)!r} must hold one class id (an integer >= 0) per row; it holds "
                            f"{raw.dtype} values of shape {raw.shape}"
                            + (f" (the smallest is {raw.min()})" if raw.size and raw.ndim == 1 else "") + ".")
        labels = torch.from_numpy(raw).long()
        if labels.shape[0] != feats.shape[0]:
            raise UserError(f"{str(lab_path)!r} has {labels.shape[0]} labels for {feats.shape[0]} features.")
    return feats, labels

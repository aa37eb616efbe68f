"""`instdisc clusters RUN_DIR`: a SeLa run's pseudo-labels judged against the classes, written out.

Reads the run's checkpoint (no model is built), scores each head with `instdisc.cluster` (NMI, ARI,
purity, Hungarian accuracy), writes RUN_DIR/pseudo_labels/head{h}.npy and a PNG grid of the purest
clusters per head.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from instdisc.cluster import cluster_grid, cluster_metrics, save_grid


def run_clusters(
    run: str | Path,
    *,
    data: str | None = None,
    heads: Sequence[int] | None = None,
    clusters: int = 10,
    per_cluster: int = 10,
    cache_dir: str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Pseudo-labels of a SeLa run's checkpoint: per head, metrics, the label file and a PNG grid.

    Writes RUN_DIR/pseudo_labels/head{h}.npy (the checkpoint's labels, index-ordered int64) and
    RUN_DIR/clusters/head{h}.png; returns one record per head (metrics where the source has labels).
    """
    import torch

    from instdisc.checkpoint import find_checkpoint, write_run_files
    from instdisc.errors import CheckpointError, UserError
    from instdisc.methods import read_run
    from instdisc.methods.sela import pseudo_label_files
    from instdisc.sources import open_source

    cfg, ck = read_run(run)  # the labels are all it needs: no model is built
    if ck.get("method") != "sela" or "labels" not in ck.get("model", {}):
        raise UserError(f"{str(run)!r} is a {ck.get('method')!r} run: only SeLa runs have cluster labels.")
    labels = torch.as_tensor(ck["model"]["labels"])  # (H, N)
    sizes = cfg.method.head_sizes()
    ckpt_file = find_checkpoint(run)
    run_dir = ckpt_file.parent.parent if ckpt_file.parent.name == "checkpoints" else ckpt_file.parent
    images = open_source(data or cfg.data.data, "train", cache_dir=cache_dir or cfg.data.cache_dir,
                         image_size=cfg.data.image_size, progress=progress)
    if len(images) != labels.shape[1]:
        raise CheckpointError(f"the checkpoint has labels for {labels.shape[1]} images but the source has {len(images)}.")
    write_run_files(run_dir, pseudo_label_files(labels, sizes, epoch=int(ck.get("state", {}).get("epoch", -1))))
    chosen = list(range(labels.shape[0])) if heads is None else list(heads)
    out = []
    for h in chosen:
        if not 0 <= h < labels.shape[0]:
            raise UserError(f"--head {h} does not exist: the run has {labels.shape[0]} head(s), 0..{labels.shape[0] - 1}.")
        pred = labels[h].numpy()
        rec: dict[str, Any] = {"head": h, "clusters": sizes[h], "used": int(len(np.unique(pred))),
                               "labels": str(run_dir / "pseudo_labels" / f"head{h}.npy")}
        if images.labels is not None:
            rec.update(cluster_metrics(pred, images.labels, num_clusters=sizes[h], num_classes=images.num_classes or None))
        grid = cluster_grid(images, pred, images.labels, clusters=clusters, per_cluster=per_cluster,
                            class_names=images.classes or None)
        rec["grid"] = str(save_grid(grid, run_dir / "clusters" / f"head{h}.png"))
        out.append(rec)
    return out

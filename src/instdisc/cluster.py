"""Clusterings against ground truth: NMI, adjusted Rand, purity, Hungarian accuracy; a sample grid.

Pure functions on (N,) integer label arrays (numpy arrays or tensors); ``pred`` are cluster ids,
``true`` class ids. Used for SeLa's pseudo-labels at every relabelling and by
``instdisc clusters RUN_DIR`` (`instdisc.evaluate.clusters`). Nothing here reads runs or imports
the rest of instdisc.

* NMI: mutual information normalised by the arithmetic mean of the two entropies (scikit-learn's
  default, the convention of the SeLa paper's tables).
* Adjusted Rand index (Hubert & Arabie 1985): pair-counting agreement, 0 for chance, 1 for equal.
* Purity: each cluster votes for its majority class; fraction of images in the majority.
  Grows trivially with the number of clusters (N singletons have purity 1).
* Hungarian accuracy: the best one-to-one matching of clusters to classes (linear assignment on
  the contingency table); meaningful when K equals the number of classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "adjusted_rand",
    "cluster_grid",
    "cluster_metrics",
    "cluster_purities",
    "contingency",
    "hungarian_accuracy",
    "nmi",
    "purity",
    "save_grid",
]


def _as_labels(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x.cpu() if hasattr(x, "cpu") else x)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array; got shape {arr.shape} dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative ids")
    return arr.astype(np.int64)


def _pair(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_labels(pred, "pred"), _as_labels(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in length: {p.shape[0]} vs {t.shape[0]}")
    if not p.size:
        raise ValueError("no labels given")
    return p, t


def contingency(pred: Any, true: Any) -> np.ndarray:
    """(max pred + 1, max true + 1) counts: entry [k, c] = images in cluster k with class c."""
    p, t = _pair(pred, true)
    table = np.zeros((int(p.max()) + 1, int(t.max()) + 1), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table


def nmi(pred: Any, true: Any) -> float:
    """Normalised mutual information (arithmetic normalisation), in [0, 1]."""
    from sklearn.metrics import normalized_mutual_info_score  # lazy: keeps `import instdisc` light

    p, t = _pair(pred, true)
    return float(normalized_mutual_info_score(t, p))


def adjusted_rand(pred: Any, true: Any) -> float:
    """Adjusted Rand index: 1 for identical partitions, about 0 for independent ones."""
    from sklearn.metrics import adjusted_rand_score

    p, t = _pair(pred, true)
    return float(adjusted_rand_score(t, p))


def purity(pred: Any, true: Any) -> float:
    """Fraction of images belonging to the majority class of their cluster."""
    table = contingency(pred, true)
    return float(table.max(1).sum() / table.sum())


def cluster_purities(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty cluster: (cluster ids, purity, size), in cluster-id order."""
    table = contingency(pred, true)
    sizes = table.sum(1)
    ids = np.flatnonzero(sizes)
    return ids, table[ids].max(1) / sizes[ids], sizes[ids]


def hungarian_accuracy(pred: Any, true: Any) -> float:
    """Accuracy under the best one-to-one map from clusters to classes (unmatched count as wrong)."""
    from scipy.optimize import linear_sum_assignment

    table = contingency(pred, true)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def cluster_metrics(
    pred: Any, true: Any, *, num_clusters: int | None = None, num_classes: int | None = None
) -> dict[str, float]:
    """{"nmi", "ari", "purity"} plus "acc" (Hungarian) when num_clusters == num_classes.

    The counts default to max id + 1 of each array; pass them when some ids may be absent.
    """
    p, t = _pair(pred, true)
    k = num_clusters if num_clusters is not None else int(p.max()) + 1
    c = num_classes if num_classes is not None else int(t.max()) + 1
    out = {"nmi": nmi(p, t), "ari": adjusted_rand(p, t), "purity": purity(p, t)}
    if k == c:
        out["acc"] = hungarian_accuracy(p, t)
    return out


def _read(images: Any, i: int) -> np.ndarray:
    return np.asarray(images.read(i) if hasattr(images, "read") else images[i], dtype=np.uint8)


def cluster_grid(
    images: Any,
    pred: Any,
    true: Any | None = None,
    *,
    clusters: int = 10,
    per_cluster: int = 10,
    tile: int = 48,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> Image.Image:
    """One row per cluster, `per_cluster` random members each: the most pure clusters first.

    Args:
        images: an ImageSet (anything with ``read(i) -> (H, W, 3) uint8``) or an (N, H, W, 3)
            uint8 array, row i = dataset index i.
        pred: (N,) cluster ids.
        true: (N,) class ids; clusters are then ranked by purity (ties: larger first) and each
            row is captioned with its majority class and purity. Without: ranked by size.
        clusters: rows to draw.
        per_cluster: images per row (fewer if the cluster is smaller).
        tile: side of each thumbnail in pixels.
        seed: which members are shown.
        class_names: names for the captions (default: the class ids).

    Returns:
        An RGB PIL image; save it with ``.save("grid.png")``.
    """
    p = _as_labels(pred, "pred")
    if true is not None:
        ids, pur, sizes = cluster_purities(p, true)
        table = contingency(p, true)
        order = np.lexsort((-sizes, -pur))  # purity first, then size
    else:
        sizes_all = np.bincount(p)
        ids = np.flatnonzero(sizes_all)
        sizes = sizes_all[ids]
        pur = np.full(len(ids), np.nan)
        order = np.argsort(-sizes, kind="stable")
    order = order[:clusters]
    caption_w, pad = 120, 2
    rows = len(order)
    grid = Image.new("RGB", (caption_w + per_cluster * (tile + pad), max(rows, 1) * (tile + pad)), "white")
    draw = ImageDraw.Draw(grid)
    rng = np.random.default_rng(seed)
    for r, j in enumerate(order):
        k = int(ids[j])
        members = np.flatnonzero(p == k)
        shown = rng.choice(members, size=min(per_cluster, len(members)), replace=False)
        y = r * (tile + pad)
        text = f"cluster {k}\nn={int(sizes[j])}"
        if true is not None:
            major = int(table[k].argmax())
            name = class_names[major] if class_names is not None and major < len(class_names) else str(major)
            text += f"\n{name} {100 * pur[j]:.0f}%"
        draw.text((4, y + 2), text, fill="black")
        for c, i in enumerate(np.sort(shown)):
            thumb = Image.fromarray(_read(images, int(i))).convert("RGB").resize((tile, tile), Image.NEAREST)
            grid.paste(thumb, (caption_w + c * (tile + pad), y))
    return grid


def save_grid(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path

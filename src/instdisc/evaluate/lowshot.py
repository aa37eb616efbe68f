"""Low-shot: k labelled images per class (Goyal et al. 2019's protocol as MMSelfSup runs it),
several seeded draws, a linear SVM or logistic regression; mean +- std per k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from torch import Tensor

from instdisc.errors import ConfigError, UserError
from instdisc.evaluate.linear import FeatureNorm, Norm
from instdisc.progress import Progress

LOW_SHOT_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 96)


def sample_per_class(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k random images of every class present (without replacement), sorted."""
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c in np.unique(labels)
    ]
    return np.sort(np.concatenate(picks))


def low_shot(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    shots: Sequence[int] = LOW_SHOT_KS,
    draws: int = 5,
    classifier: Literal["svm", "logreg"] = "svm",
    C: float = 1.0,
    norm: Norm = "l2",
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Top-1 (%) of a linear classifier trained on k images per class, for each k, over `draws`
    seeded random draws: rows {"k", "mean", "std", "runs", "n_train"}.

    Draw d of shot k uses numpy's generator seeded with (seed, k, d), so every number can be
    reproduced alone. A k larger than the smallest class gives a row with "skipped" instead.
    The classifier is scikit-learn's LinearSVC (one-vs-rest, squared hinge) or multinomial
    LogisticRegression, both with cost C, on `norm`-normalised features (fitted on the draw).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if draws < 1 or not 0 < C < math.inf or not shots or min(shots) < 1:  # NaN fails too
        raise UserError(
            f"low-shot needs draws >= 1, C > 0 and shots >= 1; got {draws}, {C}, {list(shots)}."
        )
    ty = train_y.numpy()
    smallest = int(np.bincount(ty)[np.unique(ty)].min())
    rows: list[dict[str, Any]] = []
    bar = Progress(draws * sum(k <= smallest for k in shots), desc="low-shot", enabled=progress, unit="fit")
    for k in shots:
        if k > smallest:
            rows.append({"k": k, "skipped": f"the smallest class has {smallest} training images"})
            continue
        runs = []
        for d in range(draws):
            idx = sample_per_class(ty, k, np.random.default_rng([seed, k, d]))
            fn = FeatureNorm.fit(norm, train_x[idx].float())
            xs, xq = fn(train_x[idx].float()).numpy(), fn(test_x.float()).numpy()
            if classifier == "svm":
                clf = LinearSVC(C=C, max_iter=5000)
            elif classifier == "logreg":
                clf = LogisticRegression(C=C, max_iter=2000)
            else:
                raise ConfigError(
                    f"unknown low-shot classifier {classifier!r}; choose svm or logreg."
                )
            if len(np.unique(ty[idx])) < 2:
                raise UserError("low-shot needs at least two classes.")
            clf.fit(xs, ty[idx])
            runs.append(100.0 * float((clf.predict(xq) == test_y.numpy()).mean()))
            bar.update(1, postfix=f"k={k}")
        rows.append(
            {
                "k": k,
                "mean": float(np.mean(runs)),
                "std": float(np.std(runs)),
                "runs": runs,
                "n_train": int(len(idx)),
            }
        )
    bar.close()
    return rows

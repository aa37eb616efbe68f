"""Per stage: the linear probe and weighted kNN on the pooled output of each ResNet stage (or
AlexNet conv block), MMSelfSup's feature1-4 table. The features come from
`features_for(kind="stages")`, cut up by `split_stages`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from instdisc.evaluate.knn_eval import knn_table
from instdisc.evaluate.linear import linear_probe


def stage_table(
    train_stages: Sequence[Tensor],
    train_y: Tensor,
    test_stages: Sequence[Tensor],
    test_y: Tensor,
    *,
    num_classes: int | None = None,
    knn_k: int = 200,
    knn_t: float = 0.07,
    **probe_kw: Any,
) -> list[dict[str, Any]]:
    """Linear probe and weighted kNN on the pooled output of each stage: rows {"stage", "dim",
    "linear_top1", "linear_top5", "knn_top1"} (MMSelfSup reports feature1-5 of a ResNet-50; our
    stem is not pooled, so stages 1-4 here are its feature2-5)."""
    rows = []
    prefix = (
        "conv" if len(train_stages) == 5 else "layer"
    )  # AlexNet's five conv blocks, ResNet's four stages
    for s, (tr, te) in enumerate(zip(train_stages, test_stages, strict=True)):
        lin = linear_probe(tr, train_y, te, test_y, num_classes=num_classes, **probe_kw)
        knn = knn_table(tr, train_y, te, test_y, ks=(knn_k,), ts=(knn_t,), num_classes=num_classes)[
            0
        ]
        rows.append(
            {
                "stage": f"{prefix}{s + 1}",
                "dim": int(tr.shape[1]),
                "linear_top1": lin["top1"],
                "linear_top5": lin["top5"],
                "lr": lin["lr"],
                "knn_top1": knn["top1"],
            }
        )
    return rows

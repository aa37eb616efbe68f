"""Supervised classification on the same engine: cross-entropy against fixed labels.

The labels are either the training source's ground truth or an ``.npy`` file of N integer labels
in dataset-index order, e.g. pseudo-labels exported by SeLa (RUN_DIR/pseudo_labels/head0.npy).
The latter is SeLa's "the labels are reusable" experiment (Asano et al. 2020, Sec. 4): a network
trained from scratch on the exported labels alone, with no clustering, should learn a
representation comparable to the self-labelled one.

    instdisc train --method supervised --labels runs/sela/pseudo_labels/head0.npy --data SOURCE ...
    instdisc train --method supervised --num-classes 10 --data cifar10 ...     # ground truth

The labels are (re)loaded into a buffer at every epoch start, so they are part of the checkpoint
and a run can be rebuilt from its checkpoint without the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc.errors import ConfigError, DataError
from instdisc.methods.base import EpochContext, Method, StepOutput, full_precision


@dataclass
class SupervisedConfig:
    labels: str | None = field(
        default=None,
        metadata={"help": "an .npy of N integer labels in dataset order (e.g. SeLa's pseudo_labels/head0.npy); "
                          "default: the source's ground truth", "path": "file"},
    )
    num_classes: int = field(
        default=0, metadata={"help": "classifier outputs; 0 = 1 + the largest label of --labels, or the training "
                                     "split's number of classes with its ground truth"}
    )

    def fill_defaults(self, num_samples: int, num_classes: int = 0) -> list[str]:
        """--num-classes 0: 1 + the largest label of --labels, or (ground truth) the training split's
        number of classes. Resolved before the model is built and kept in the run's config, so
        rebuilding from a checkpoint never needs the label file again."""
        if self.num_classes != 0:
            return []
        if self.labels is not None:
            self.num_classes = int(load_label_file(self.labels, num_samples).max()) + 1
            return [f"--num-classes {self.num_classes} (1 + the largest label of --labels)"]
        if num_classes < 1:
            return []
        self.num_classes = num_classes
        return [f"--num-classes {num_classes} (the training split's classes)"]


def load_label_file(path: str | Path, num_samples: int) -> np.ndarray:
    """(N,) int64 labels from an .npy file, with a readable error for every way it can be wrong."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"label file {str(p)!r} does not exist (expected an .npy of {num_samples} integer labels).")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{str(p)!r} is not a readable .npy file: {e}") from None
    if arr.ndim != 1 or arr.shape[0] != num_samples:
        raise DataError(
            f"{str(p)!r} holds an array of shape {tuple(arr.shape)}; expected ({num_samples},): one label per "
            "training image, in dataset order. Was it exported from a run on this same training source?"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{str(p)!r} holds {arr.dtype} values; labels must be integers.")
    if arr.size and arr.min() < 0:
        raise DataError(f"{str(p)!r} holds negative labels (smallest {int(arr.min())}); labels must be >= 0.")
    return arr.astype(np.int64)


class Supervised(Method):
    """Backbone -> linear classifier, cross-entropy against the labels buffer."""

    Config = SupervisedConfig

    targets: Tensor

    def __init__(self, backbone: nn.Module, feat_dim: int, num_samples: int, cfg: SupervisedConfig) -> None:
        super().__init__(backbone, feat_dim, num_samples)
        if cfg.num_classes < 0:
            raise ConfigError(f"--num-classes must be >= 0; got {cfg.num_classes}.")
        if cfg.num_classes == 0:
            raise ConfigError(
                "--num-classes is needed when training on the source's ground-truth labels (e.g. 10 for "
                "CIFAR-10), or pass --labels FILE.npy."
            )
        self.cfg = cfg
        self.classifier = nn.Linear(feat_dim, cfg.num_classes)
        # -1 = "not loaded yet": cross-entropy refuses it, so a missing epoch-start hook cannot go unnoticed.
        self.register_buffer("targets", torch.full((num_samples,), -1, dtype=torch.long))  # (N,)

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, Any]:
        if self.cfg.labels is not None:
            labels = torch.from_numpy(load_label_file(self.cfg.labels, self.num_samples))
        elif ctx.labels is not None:
            labels = ctx.labels.long()
        else:
            raise DataError("the training source has no labels: pass --labels FILE.npy (e.g. SeLa's pseudo-labels).")
        if labels.shape != (self.num_samples,):
            raise DataError(f"got {tuple(labels.shape)} labels for {self.num_samples} training images.")
        if int(labels.max()) >= self.cfg.num_classes:
            raise ConfigError(
                f"labels go up to {int(labels.max())} but --num-classes is {self.cfg.num_classes}; "
                f"use --num-classes {int(labels.max()) + 1} (or 0 to infer it from --labels)."
            )
        self.targets.copy_(labels.to(self.targets.device))
        return {}

    def forward(self, views: list[Tensor], idx: Tensor) -> StepOutput:
        (x,) = views
        feats = self.backbone(x)  # (B, F), under the loop's autocast
        with full_precision(feats):  # logits and cross-entropy in fp32 (base.full_precision)
            logits = self.classifier(feats.float())  # (B, C)
            target = self.targets[idx]  # (B,)
            loss = F.cross_entropy(logits, target)
        acc = (logits.detach().argmax(1) == target).float().mean()
        return StepOutput(loss=loss, logs={"train_acc": acc})

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.backbone(x).float(), dim=1)  # (B, D)

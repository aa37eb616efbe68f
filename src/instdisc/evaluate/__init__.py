"""Standard protocols for judging frozen features, from a run, a published checkpoint or exported files.

* kNN sweep: weighted kNN (Wu et al. 2018, Sec. 3.4) for several k and temperatures from one
  similarity pass (MMSelfSup's table: k = 10, 20, 100, 200). Banks of `FAISS_MIN_ROWS` rows or
  more go through faiss (``pip install faiss-cpu``) when it is installed.
* Linear probe on cached features: a linear classifier on frozen pooled backbone features (or on
  the embedding), inputs batch-normalised (standardised with training-set statistics) or
  L2-normalised, SGD with momentum and a cosine schedule; top-1 and top-5. The learning rate is
  picked from a small grid on a held-out tenth of the training set, then the classifier is
  retrained on all of it. `linear_probe_augmented` is the slower variant that feeds augmented
  images through the frozen backbone every epoch (for GPUs).
* Low-shot: k labelled images per class (k = 1 ... 96, Goyal et al. 2019's low-shot protocol as
  MMSelfSup runs it), several seeded draws, a linear SVM or logistic regression; mean +- std per k.
* Per stage: the same probes on the pooled output of each ResNet stage (MMSelfSup's feature1-4).

Every protocol is a plain function on tensors; `features_for` turns "a run directory, a published
checkpoint or two .npy files" into those tensors, caching what it embeds under RUN_DIR/eval/.
See docs/evaluation.md for the defaults and why.

Modules
-------
``subject``
    What is evaluated: `Subject`, `load_subject` (a run, a checkpoint or released weights).
``extraction``
    Features of a subject on a source, cached under RUN_DIR/eval/features (`extract`), or from
    exported files; `features_for`, `EvalFeatures`, `split_stages`.
``results``
    Result files (`save_result`, `load_results`) and `format_table`.
``clusters``
    `instdisc clusters RUN_DIR`: a SeLa run's pseudo-labels scored, exported and drawn.
``knn_eval``
    The kNN sweep (`knn_scores`, `knn_table`), its torch / faiss backend choice, and `nearest`.
    (The weighted-kNN core itself is `instdisc.knn`.)
``linear``
    `FeatureNorm`, `train_linear`, `linear_probe` and `linear_probe_augmented`.
``lowshot``
    `sample_per_class`, `low_shot`.
``stages``
    `stage_table`, the per-stage probes.

Every public name is re-exported here, so ``from instdisc.evaluate import linear_probe`` keeps
working. The re-exports are copies of the bindings: to change a module-level setting such as
`FAISS_MIN_ROWS` (or to monkeypatch `faiss_available`), set it on the module that reads it,
``instdisc.evaluate.knn_eval``.
"""

from __future__ import annotations

from instdisc.evaluate.extraction import (
    EvalFeatures,
    FeatureKind,
    embed_pair,
    extract,
    features_for,
    open_eval_sets,
    open_images,
    split_stages,
)
from instdisc.evaluate.knn_eval import (
    DEFAULT_KS,
    FAISS_MIN_ROWS,
    faiss_available,
    knn_evaluate,
    knn_row,
    knn_scores,
    knn_table,
    nearest,
    resolve_backend,
)
from instdisc.evaluate.linear import (
    FeatureNorm,
    Norm,
    cosine_lrs,
    linear_probe,
    linear_probe_augmented,
    probe_augment_config,
    train_linear,
)
from instdisc.evaluate.lowshot import LOW_SHOT_KS, low_shot, sample_per_class
from instdisc.evaluate.results import format_table, load_results, save_result
from instdisc.evaluate.stages import stage_table
from instdisc.evaluate.subject import Subject, load_subject, stage_dims, subject_of

__all__ = [
    "DEFAULT_KS",
    "FAISS_MIN_ROWS",
    "LOW_SHOT_KS",
    "EvalFeatures",
    "FeatureKind",
    "FeatureNorm",
    "Norm",
    "Subject",
    "cosine_lrs",
    "embed_pair",
    "extract",
    "faiss_available",
    "features_for",
    "format_table",
    "knn_evaluate",
    "knn_row",
    "knn_scores",
    "knn_table",
    "linear_probe",
    "linear_probe_augmented",
    "load_results",
    "load_subject",
    "low_shot",
    "nearest",
    "open_eval_sets",
    "open_images",
    "probe_augment_config",
    "resolve_backend",
    "sample_per_class",
    "save_result",
    "split_stages",
    "stage_dims",
    "subject_of",
    "stage_table",
    "train_linear",
]

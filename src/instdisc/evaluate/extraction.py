"""Features for the protocols: a `Subject`'s embedding, pooled backbone or per-stage features
of every image of a source (`extract`, cached as .npy under RUN_DIR/eval/features and keyed by the
weights), or exported feature files; `features_for` returns either as labelled `EvalFeatures`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from instdisc.errors import ConfigError, InstdiscWarning, UserError
from instdisc.evaluate.subject import Subject, load_subject, stage_dims

FeatureKind = Literal["embedding", "backbone", "stages"]


def _feature_fn(subject: Subject, kind: FeatureKind) -> Callable[[Tensor], Tensor]:
    if kind == "embedding":
        return subject.embed
    if kind == "backbone":
        return lambda x: subject.backbone(x).float()
    if kind == "stages":
        stage_dims(subject)
        return lambda x: torch.cat(
            [s.float() for s in subject.backbone.forward_stages(x)], dim=1
        )  # (B, sum dims)
    raise ConfigError(f"unknown feature kind {kind!r}; choose embedding, backbone or stages.")


def _open_kw(
    subject: Subject | None, data: str | None, cache_dir: str | None, progress: bool
) -> tuple[str, dict[str, Any]]:
    spec = data or (subject.data if subject is not None else None)
    if not spec:
        raise UserError(
            "no data source: pass --data (published weights do not say what they were trained on)."
        )
    # A run reopens its data as it trained on it; published weights get the source's default
    # (small images as they are, streamed ones resized to 256, then centre-cropped by preprocess).
    return spec, dict(
        cache_dir=cache_dir or (subject.cache_dir if subject else None),
        image_size=subject.image_size if subject is not None else None,
        progress=progress,
    )


def open_eval_sets(
    subject: Subject | None,
    data: str | None,
    *,
    cache_dir: str | None = None,
    drop_unknown: bool = False,
    progress: bool = False,
):
    """The train and test `ImageSet` of an evaluation: those of `data`, else the run's own (its
    training source's train split, and the test split of its --test-data if it had one, else of
    its training source).

    The test split is labelled by the train split's class names (`instdisc.sources.align_classes`):
    a class the train split lacks is an error, unless ``drop_unknown`` (or, on the run's own data,
    the run was trained with ``--drop-unknown-classes``).
    """
    from instdisc.sources import open_eval_split, open_source

    spec, kw = _open_kw(subject, data, cache_dir, progress)
    test_spec = spec
    if data is None and subject is not None:
        drop_unknown = drop_unknown or bool(subject.config.get("data", {}).get("drop_unknown_classes"))
        test_spec = subject.test_data or spec  # a run trained with --test-data is judged on it
    train = open_source(spec, "train", **kw)
    test = open_eval_split(
        test_spec,
        "test",
        classes=train.classes if train.labels is not None else None,
        drop_unknown=drop_unknown,
        **kw,
    )
    return train, test


def open_images(
    subject: Subject | None,
    data: str | None,
    split: str,
    *,
    cache_dir: str | None = None,
    drop_unknown: bool = False,
    progress: bool = False,
):
    """One split of `open_eval_sets`; the train split alone needs no test split."""
    if split == "train":
        from instdisc.sources import open_source

        spec, kw = _open_kw(subject, data, cache_dir, progress)
        return open_source(spec, "train", **kw)
    return open_eval_sets(
        subject, data, cache_dir=cache_dir, drop_unknown=drop_unknown, progress=progress
    )[1]


@torch.no_grad()
def extract(
    subject: Subject,
    images,
    kind: FeatureKind = "embedding",
    *,
    batch_size: int = 256,
    cache: Path | None = None,
    progress: bool = False,
    keep_device: bool = False,
) -> Tensor:
    """Features of every image (eval transform), row i = index i; cached as .npy when `cache` is set.

    The cache file name includes a hash of the weights' fingerprint, the source, split, kind,
    transform and the images' content key (`_content_key`), so a retrained run, another source or
    a folder edited in place never reads stale features. The features are
    returned on the CPU, or (keep_device, no cache) on the subject's device.
    """
    from instdisc.features import extract_features, load_features, save_features

    path = None
    if cache is not None:
        key = hashlib.sha1(
            json.dumps(
                [
                    subject.fingerprint,
                    images.name,
                    images.split,
                    len(images),
                    images.meta.get("dropped_unknown", 0),
                    kind,
                    subject.size,
                    list(subject.mean),
                    list(subject.std),
                    _content_key(images),
                ]
            ).encode()
        ).hexdigest()[:12]
        path = Path(cache) / f"{images.split}-{kind}-{key}.npy"
    if path is not None and path.is_file():
        feats, _ = load_features(path)
        if feats.shape[0] == len(images):
            return feats
    feats = (
        extract_features(
            _feature_fn(subject, kind),
            images,
            size=subject.size,
            mean=subject.mean,
            std=subject.std,
            batch_size=batch_size,
            device=subject.device,
            workers=subject.workers,
            desc=f"{kind} {images.split}",
            progress=progress,
        )
        .float()
    )
    if not (keep_device and path is None):
        feats = feats.cpu()
    if path is not None:
        meta = {
            "source": images.name,
            "split": images.split,
            "kind": kind,
            "weights": subject.fingerprint,
            "classes": images.classes,
        }
        save_features(path, feats, images.labels, meta)
        _prune_cache(path, meta)
    return feats


def _content_key(images) -> str | None:  # noqa: ANN001
    """What identifies the images themselves, beyond their source's name and count, so that a folder
    whose images were edited, replaced or renamed in place is embedded again: a decoded set's
    array-cache key (it hashes the source's content: file names, sizes and mtimes, or an archive's
    bytes), a streamed set's member names and sizes. None for sets that carry neither."""
    key = images.meta.get("cache_key")
    if key:
        return str(key)
    members = getattr(images, "member_keys", None)
    if members:
        return hashlib.sha1("\n".join(members).encode("utf-8", "surrogateescape")).hexdigest()
    return None


def _prune_cache(keep: Path, meta: dict[str, Any]) -> None:
    """Delete cached features of the same source, split and kind made from older weights."""
    for other in keep.parent.glob(f"{meta['split']}-{meta['kind']}-*.meta.json"):
        stem = other.name[: -len(".meta.json")]
        if stem == keep.name[: -len(".npy")]:
            continue
        try:
            old = json.loads(other.read_text())
        except (ValueError, OSError):
            continue
        if old.get("source") == meta["source"] and old.get("weights") != meta["weights"]:
            for suffix in (".npy", ".labels.npy", ".meta.json"):
                (other.parent / f"{stem}{suffix}").unlink(missing_ok=True)


@dataclass
class EvalFeatures:
    """Train/test features and labels for the protocols, and where results go."""

    train_x: Tensor  # (N, D)
    train_y: Tensor  # (N,)
    test_x: Tensor  # (M, D)
    test_y: Tensor  # (M,)
    num_classes: int
    classes: list[str]
    kind: str
    save_dir: Path | None = None
    subject: Subject | None = None
    train_images: Any = None
    test_images: Any = None
    stage_dims: tuple[int, ...] = ()


@torch.no_grad()
def embed_pair(
    subject: Subject,
    train,
    test,
    kind: FeatureKind = "embedding",
    *,
    bank: Tensor | None = None,
    batch_size: int = 256,
    cache: Path | None = None,
    progress: bool = False,
    keep_device: bool = False,
) -> EvalFeatures:
    """The one way a model's train and test splits become labelled features for the protocols.

    Every command that embeds (``knn``/``linear``/``lowshot``/``stages``/``report`` on a run, the
    training loop's kNN monitor and final kNN, the demo, the GPU benchmark) comes through here, so
    they share the eval transform, the feature cache and one class-count rule: C = the train
    split's classes (the test split is already numbered by them, `open_eval_sets`).

    Args:
        train, test: `ImageSet`s, both labelled.
        bank: use these (N, D) rows as the train features instead of embedding the train split
            (the training loop's cheap monitor passes the memory bank).
        cache, keep_device: as in `extract`.
    Raises:
        UserError: a split without labels.
    """
    if train.labels is None or test.labels is None:
        raise UserError(
            f"{train.name!r} has no labels: these protocols need labelled train and test splits."
        )
    module = subject.module
    was_training = module.training
    module.eval()  # BatchNorm on its running statistics; a training method is put back after
    try:
        kw = dict(batch_size=batch_size, cache=cache, progress=progress, keep_device=keep_device)
        tx = bank if bank is not None else extract(subject, train, kind, **kw)
        qx = extract(subject, test, kind, **kw)
    finally:
        module.train(was_training)
    return EvalFeatures(
        tx,
        torch.from_numpy(train.labels).to(tx.device),
        qx,
        torch.from_numpy(test.labels).to(qx.device),
        len(train.classes),
        list(train.classes),
        kind,
        subject=subject,
        train_images=train,
        test_images=test,
        stage_dims=stage_dims(subject) if kind == "stages" else (),
    )


def features_for(
    run: str | None = None,
    *,
    train: str | None = None,
    test: str | None = None,
    data: str | None = None,
    kind: FeatureKind = "embedding",
    device: str = "auto",
    layout: str | None = None,
    batch_size: int = 256,
    cache_dir: str | None = None,
    use_cache: bool = True,
    drop_unknown: bool = False,
    progress: bool = False,
) -> EvalFeatures:
    """Labelled train and test features from a run / checkpoint (embedded, cached) or from files.

    Label ids are the train split's: the test split is mapped onto its class names (``drop_unknown``:
    see `open_eval_sets`); two feature files must carry the same class list in their .meta.json.

    Raises:
        UserError: neither a run nor both files, a source without labels, a test class the train
            split lacks, or feature files whose class lists differ.
    """
    from instdisc.features import load_features

    if run and (train or test):  # one would be ignored: say so rather than evaluate the other
        raise UserError("give a run directory / checkpoint or --train/--test feature files, not both.")
    if run:
        subject = load_subject(run, device=device, layout=layout)
        save_dir = subject.run_dir / "eval" if subject.run_dir is not None else None
        cache = save_dir / "features" if save_dir is not None and use_cache else None
        tr, te = open_eval_sets(
            subject, data, cache_dir=cache_dir, drop_unknown=drop_unknown, progress=progress
        )
        ev = embed_pair(subject, tr, te, kind, batch_size=batch_size, cache=cache, progress=progress)
        ev.save_dir = save_dir
        return ev
    if not (train and test):
        raise UserError(
            "give a run directory / checkpoint, or both --train and --test feature files."
        )
    if kind == "stages":
        raise UserError(
            "per-stage evaluation needs a run directory or checkpoint (exported files hold one feature)."
        )
    tx, ty = load_features(train)
    qx, qy = load_features(test)
    if ty is None or qy is None:
        raise UserError(
            "these protocols need FILE.labels.npy next to both feature files (written by `embed`)."
        )
    if tx.shape[1] != qx.shape[1]:
        raise UserError(f"train features have {tx.shape[1]} dims but test features {qx.shape[1]}.")
    classes, test_classes = _meta_classes(train), _meta_classes(test)
    if classes is not None and test_classes is not None and classes != test_classes:
        only_train = [c for c in classes if c not in test_classes]
        only_test = [c for c in test_classes if c not in classes]
        diff = "; ".join(
            part
            for part in (
                f"only in --train: {', '.join(map(repr, only_train[:10]))}" if only_train else "",
                f"only in --test: {', '.join(map(repr, only_test[:10]))}" if only_test else "",
            )
            if part
        ) or "the same names in another order"
        raise UserError(
            f"--train {train} and --test {test} number their labels by different class lists "
            f"({diff}), so their label ids do not mean the same classes. Export both from the same run "
            "with `instdisc embed` (it numbers every split by the training split's classes)."
        )
    if classes is None or test_classes is None:
        warnings.warn(
            "a feature file has no class list in its .meta.json, so the two files' label ids cannot be "
            "checked against each other; make sure both were numbered by the same classes.",
            InstdiscWarning,
            stacklevel=2,
        )
    classes = classes or test_classes or []
    top = int(max(ty.max(), qy.max())) + 1 if len(ty) and len(qy) else 0
    if classes and top > len(classes):
        raise UserError(
            f"the feature files hold label {top - 1} but their .meta.json lists {len(classes)} classes."
        )
    return EvalFeatures(tx, ty, qx, qy, len(classes) or top, classes, kind="file")


def _meta_classes(npy: str) -> list[str] | None:
    """The class list in FILE.meta.json; None when there is none (no meta file, or no classes)."""
    p = Path(npy)
    meta = p.with_name(p.name[: -len(".npy")] + ".meta.json") if p.name.endswith(".npy") else None
    if meta is None or not meta.is_file():
        return None
    try:
        classes = json.loads(meta.read_text()).get("classes")
    except (ValueError, OSError, AttributeError):
        return None
    return [str(c) for c in classes] if isinstance(classes, list) and classes else None


def split_stages(x: Tensor, dims: Sequence[int]) -> list[Tensor]:
    """(N, sum dims) -> one (N, d_s) tensor per stage."""
    return list(torch.split(x, list(dims), dim=1))

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
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc.errors import CheckpointError, ConfigError, UserError
from instdisc.knn import knn_sweep, scores_from_neighbours, topk_accuracy

DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
LOW_SHOT_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 96)
# Banks with at least this many rows use faiss under backend="auto" (when it is installed). Below
# it the chunked torch path is as fast (measured: 10,000 x 50,000 and 2,000 x 1,000,000 at
# D = 128 take about the same time with either on a 2-core CPU); above it the torch path's
# normalised copy of the bank passes 1 GiB and each of its query chunks shrinks to <= 32 rows.
FAISS_MIN_ROWS = 2_000_000
FeatureKind = Literal["embedding", "backbone", "stages"]
Norm = Literal["bn", "l2", "none"]


# --------------------------------------------------------------------------------------------
# What is evaluated: a run's model or published weights
# --------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """A frozen model and the eval transform its features need.

    Attributes:
        name: shown in tables and reports.
        module: the method (or `published.PublishedModel`), in eval mode on `device`.
        embed: (B, 3, H, W) normalised images -> (B, D) L2-normalised embedding.
        backbone: (B, 3, H, W) -> (B, F) pooled backbone features.
        size, mean, std: the eval transform (`augment.preprocess`).
        data: the run's training source (default for --data), None for published weights.
        image_size, workers, cache_dir: how the run opened its data.
        run_dir: results and feature caches go to run_dir/eval; None for published weights.
        fingerprint: identifies the weights (path, size, mtime) for the feature cache.
    """

    name: str
    module: nn.Module
    embed: Callable[[Tensor], Tensor]
    backbone: nn.Module
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    data: str | None = None
    image_size: int | None = None
    workers: int = 4
    cache_dir: str | None = None
    run_dir: Path | None = None
    fingerprint: str = ""
    config: dict[str, Any] = field(default_factory=dict)


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def load_subject(path: str | Path, *, device: str | torch.device = "auto", layout: str | None = None) -> Subject:
    """A run directory, an instdisc checkpoint or a published checkpoint -> `Subject`.

    Args:
        path: RUN_DIR, RUN_DIR/checkpoints/last.pt, or a released .pth/.pth.tar (see published.py).
        device: auto | cpu | cuda | cuda:N.
        layout: force a published layout (published.LAYOUTS); default: detect.
    """
    from instdisc import published
    from instdisc.checkpoint import find_checkpoint, load_checkpoint

    dev = _device(device)
    p = Path(path)
    if layout is None and p.is_dir():
        ck = load_checkpoint(p)
        return _subject_from_run(ck, find_checkpoint(p), dev, run_dir=p.parent if p.name == "checkpoints" else p)
    if not p.is_file():
        raise UserError(f"{str(p)!r} is neither a run directory nor a checkpoint file.")
    obj = published.read_weights(p)
    if layout is None and published.is_instdisc_checkpoint(obj):
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
        return _subject_from_run(obj, p, dev, run_dir=run_dir)
    model = published.load_published(obj, layout=layout, source=str(p)).to(dev).eval()
    mean, std = model.norm_stats
    return Subject(
        name=f"{p.name} ({model.layout}, {model.arch})", module=model, embed=model.embed,
        backbone=model.backbone, size=model.input_size, mean=mean, std=std, device=dev,
        fingerprint=_fingerprint(p), config={"published_layout": model.layout, "arch": model.arch},
    )


def _subject_from_run(ck: dict[str, Any], ck_path: Path, dev: torch.device, *, run_dir: Path | None) -> Subject:
    from instdisc.config import TrainConfig
    from instdisc.engine import build_method

    cfg = TrainConfig.from_dict(ck["config"])
    method = build_method(cfg, int(ck["num_samples"]))
    try:
        method.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(ck_path)!r} does not match its own config: {str(e).splitlines()[0]}") from None
    method = method.to(dev).eval()
    a = cfg.aug
    name = run_dir.name if run_dir is not None else ck_path.name
    return Subject(
        name=f"{name} ({cfg.run.method}, {cfg.model.arch} w{cfg.model.width})", module=method,
        embed=method.embed, backbone=method.backbone, size=a.size, mean=tuple(a.mean), std=tuple(a.std),
        device=dev, data=cfg.data.data, image_size=cfg.data.image_size, workers=cfg.data.workers,
        cache_dir=cfg.data.cache_dir, run_dir=run_dir, fingerprint=_fingerprint(ck_path), config=cfg.to_dict(),
    )


def stage_dims(subject: Subject) -> tuple[int, ...]:
    dims = getattr(subject.backbone, "stage_dims", None)
    if dims is None or not hasattr(subject.backbone, "forward_stages"):
        raise UserError(f"the backbone of {subject.name} has no per-stage features (only ResNets do).")
    return tuple(dims)


def _feature_fn(subject: Subject, kind: FeatureKind) -> Callable[[Tensor], Tensor]:
    if kind == "embedding":
        return subject.embed
    if kind == "backbone":
        return lambda x: subject.backbone(x).float()
    if kind == "stages":
        stage_dims(subject)
        return lambda x: torch.cat([s.float() for s in subject.backbone.forward_stages(x)], dim=1)  # (B, sum dims)
    raise ConfigError(f"unknown feature kind {kind!r}; choose embedding, backbone or stages.")


def open_images(subject: Subject | None, data: str | None, split: str, *, cache_dir: str | None = None,
                progress: bool = False):
    """The `ImageSet` of one split, defaulting to the run's own source."""
    from instdisc.sources import open_source

    spec = data or (subject.data if subject is not None else None)
    if not spec:
        raise UserError("no data source: pass --data (published weights do not say what they were trained on).")
    # A run reopens its data as it trained on it; published weights get the source's default
    # (small images as they are, streamed ones resized to 256, then centre-cropped by preprocess).
    image_size = subject.image_size if subject is not None else None
    return open_source(spec, split, cache_dir=cache_dir or (subject.cache_dir if subject else None),
                       image_size=image_size, progress=progress)


@torch.no_grad()
def extract(
    subject: Subject,
    images,
    kind: FeatureKind = "embedding",
    *,
    batch_size: int = 256,
    cache: Path | None = None,
    progress: bool = False,
) -> Tensor:
    """Features of every image (eval transform), row i = index i; cached as .npy when `cache` is set.

    The cache file name includes a hash of the weights' fingerprint, the source, split, kind and
    transform, so a retrained run or another source never reads stale features.
    """
    from instdisc.features import extract_features, load_features, save_features

    key = hashlib.sha1(
        json.dumps([subject.fingerprint, images.name, images.split, len(images), kind, subject.size,
                    list(subject.mean), list(subject.std)]).encode()
    ).hexdigest()[:12]
    path = None if cache is None else Path(cache) / f"{images.split}-{kind}-{key}.npy"
    if path is not None and path.is_file():
        feats, _ = load_features(path)
        if feats.shape[0] == len(images):
            return feats
    feats = extract_features(
        _feature_fn(subject, kind), images, size=subject.size, mean=subject.mean, std=subject.std,
        batch_size=batch_size, device=subject.device, workers=subject.workers,
        desc=f"{kind} {images.split}", progress=progress,
    ).float().cpu()
    if path is not None:
        meta = {"source": images.name, "split": images.split, "kind": kind, "weights": subject.fingerprint,
                "classes": images.classes}
        save_features(path, feats, images.labels, meta)
        _prune_cache(path, meta)
    return feats


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
    progress: bool = False,
) -> EvalFeatures:
    """Labelled train and test features from a run / checkpoint (embedded, cached) or from files.

    Raises:
        UserError: neither a run nor both files, or a source without labels.
    """
    from instdisc.features import load_features

    if run:
        subject = load_subject(run, device=device, layout=layout)
        save_dir = subject.run_dir / "eval" if subject.run_dir is not None else None
        cache = save_dir / "features" if save_dir is not None and use_cache else None
        tr = open_images(subject, data, "train", cache_dir=cache_dir, progress=progress)
        te = open_images(subject, data, "test", cache_dir=cache_dir, progress=progress)
        if tr.labels is None or te.labels is None:
            raise UserError(f"{tr.name!r} has no labels: these protocols need labelled train and test splits.")
        tx = extract(subject, tr, kind, batch_size=batch_size, cache=cache, progress=progress)
        qx = extract(subject, te, kind, batch_size=batch_size, cache=cache, progress=progress)
        c = max(len(tr.classes), int(tr.labels.max()) + 1, int(te.labels.max()) + 1)
        return EvalFeatures(
            tx, torch.from_numpy(tr.labels), qx, torch.from_numpy(te.labels), c, list(tr.classes), kind,
            save_dir=save_dir, subject=subject, train_images=tr, test_images=te,
            stage_dims=stage_dims(subject) if kind == "stages" else (),
        )
    if not (train and test):
        raise UserError("give a run directory / checkpoint, or both --train and --test feature files.")
    if kind == "stages":
        raise UserError("per-stage evaluation needs a run directory or checkpoint (exported files hold one feature).")
    tx, ty = load_features(train)
    qx, qy = load_features(test)
    if ty is None or qy is None:
        raise UserError("these protocols need FILE.labels.npy next to both feature files (written by `embed`).")
    if tx.shape[1] != qx.shape[1]:
        raise UserError(f"train features have {tx.shape[1]} dims but test features {qx.shape[1]}.")
    classes = _meta_classes(train)
    c = max(len(classes), int(ty.max()) + 1, int(qy.max()) + 1)
    return EvalFeatures(tx, ty, qx, qy, c, classes, kind="file")


def _meta_classes(npy: str) -> list[str]:
    p = Path(npy)
    meta = p.with_name(p.name[: -len(".npy")] + ".meta.json") if p.name.endswith(".npy") else None
    if meta is not None and meta.is_file():
        try:
            return list(json.loads(meta.read_text()).get("classes") or [])
        except (ValueError, OSError):
            return []
    return []


def split_stages(x: Tensor, dims: Sequence[int]) -> list[Tensor]:
    """(N, sum dims) -> one (N, d_s) tensor per stage."""
    return list(torch.split(x, list(dims), dim=1))


def save_result(save_dir: Path | None, name: str, payload: dict[str, Any]) -> Path | None:
    """Write save_dir/NAME.json (the report reads these); no-op without a directory."""
    if save_dir is None:
        return None
    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_dir / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"protocol": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}, indent=2))
    tmp.replace(path)
    return path


def load_results(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every RUN_DIR/eval/*.json written by `save_result`, by protocol name."""
    out = {}
    d = Path(run_dir) / "eval"
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            out[p.stem] = json.loads(p.read_text())
        except (ValueError, OSError):
            continue
    return out


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Plain-text table of `rows` (floats with 2 decimals)."""

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# kNN sweep
# --------------------------------------------------------------------------------------------


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, num_bank: int) -> str:
    """"auto" -> "faiss" for banks of `FAISS_MIN_ROWS` rows or more when faiss is installed, else "torch"."""
    if backend == "auto":
        return "faiss" if num_bank >= FAISS_MIN_ROWS and faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise UserError("--backend faiss needs the faiss-cpu package: pip install 'instdisc[faiss]' (or faiss-cpu).")
    if backend not in ("torch", "faiss"):
        raise ConfigError(f"unknown kNN backend {backend!r}; choose auto, torch or faiss.")
    return backend


@torch.no_grad()
def _faiss_sweep(
    query: Tensor, bank: Tensor, bank_labels: Tensor, ks: list[int], ts: Sequence[float], c: int, chunk: int
) -> dict[tuple[int, float], Tensor]:
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    bank = F.normalize(bank.float().cpu(), dim=1)
    index = faiss.IndexFlatIP(bank.shape[1])  # exact inner product = cosine on normalised rows
    index.add(np.ascontiguousarray(bank.numpy()))
    labels = bank_labels.cpu()
    out: dict[tuple[int, float], list[Tensor]] = {(k, t): [] for k in ks for t in ts}
    for start in range(0, query.shape[0], chunk):
        q = F.normalize(query[start : start + chunk].float().cpu(), dim=1)
        sims, idx = index.search(np.ascontiguousarray(q.numpy()), ks[-1])  # (q, k_max) each, sorted
        top_y = labels[torch.from_numpy(idx)]  # (q, k_max)
        for key, s in scores_from_neighbours(torch.from_numpy(sims), top_y, ks=ks, ts=ts, num_classes=c).items():
            out[key].append(s)
    return {key: torch.cat(v) for key, v in out.items()}


@torch.no_grad()
def knn_scores(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ts: Sequence[float] = (0.07,),
    num_classes: int | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> dict[tuple[int, float], Tensor]:
    """Weighted-kNN scores for every (k, t) from one neighbour search of the largest k.

    Args:
        query: (Q, D); bank: (N, D); bank_labels: (N,).
        backend: "torch" (chunked matmul + top-k, knn.knn_sweep), "faiss" (exact IndexFlatIP) or
            "auto" (`resolve_backend`). Both return the same neighbours; scores agree to float
            rounding.
    Returns:
        {(k, t): (Q, C)}, k clipped to N.
    """
    n = bank.shape[0]
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise UserError(f"query (Q, D) and bank (N, D) must share D; got {tuple(query.shape)} and {tuple(bank.shape)}.")
    ks_c = sorted({min(int(k), n) for k in ks})
    if ks_c[0] < 1 or any(t <= 0 for t in ts):
        raise UserError(f"k must be >= 1 and t > 0; got k={list(ks)}, t={list(ts)}.")
    c = int(num_classes) if num_classes is not None else int(bank_labels.max()) + 1
    if resolve_backend(backend, n) == "faiss":
        return _faiss_sweep(query, bank, bank_labels, ks_c, ts, c, chunk_size or 4096)
    return knn_sweep(query, bank, bank_labels, ks=ks_c, ts=ts, num_classes=c, chunk_size=chunk_size)


def knn_table(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *,
    ks: Sequence[int] = DEFAULT_KS, ts: Sequence[float] = (0.07,), num_classes: int | None = None,
    backend: str = "auto",
) -> list[dict[str, Any]]:
    """Rows {"k", "t", "top1", "top5"} (percent) of the kNN sweep, sorted by t then k."""
    c = num_classes or int(max(train_y.max(), test_y.max())) + 1
    scores = knn_scores(test_x, train_x, train_y, ks=ks, ts=ts, num_classes=c, backend=backend)
    rows = [{"k": k, "t": t, **topk_accuracy(s, test_y)} for (k, t), s in scores.items()]
    return sorted(rows, key=lambda r: (r["t"], r["k"]))


@torch.no_grad()
def nearest(query: Tensor, bank: Tensor, k: int, *, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Top-k cosine neighbours: (Q, k) similarities (descending) and (Q, k) bank indices."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    sims, idx = [], []
    for start in range(0, query.shape[0], chunk_size):
        s = F.normalize(query[start : start + chunk_size].float(), dim=1) @ bank.t()  # (q, N)
        top = s.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureNorm:
    """The input normalisation of a linear probe, fitted on training features only.

    "bn": subtract the training mean and divide by the training std per dimension, i.e. a
    BatchNorm1d without affine parameters whose statistics are those of the whole training set
    (MAE's probe uses such a BN). "l2": unit rows, times sqrt(D) so that a dimension has about unit
    scale and one learning-rate grid suits both. "none": raw features.
    """

    kind: Norm
    mean: Tensor | None = None  # (D,)
    std: Tensor | None = None  # (D,)

    @classmethod
    def fit(cls, kind: Norm, x: Tensor) -> FeatureNorm:
        if kind == "bn":
            return cls(kind, x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6))
        if kind in ("l2", "none"):
            return cls(kind)
        raise ConfigError(f"unknown probe normalisation {kind!r}; choose bn, l2 or none.")

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "bn":
            assert self.mean is not None and self.std is not None
            return (x - self.mean.to(x.device)) / self.std.to(x.device)
        if self.kind == "l2":
            return F.normalize(x, dim=1) * math.sqrt(x.shape[1])
        return x


def cosine_lrs(lr: float, total_steps: int) -> Tensor:
    """Per-step learning rates, cosine from lr to 0: (total_steps,)."""
    t = torch.arange(total_steps, dtype=torch.float64) / max(total_steps, 1)
    return lr * 0.5 * (1 + torch.cos(math.pi * t))


def train_linear(
    x: Tensor, y: Tensor, num_classes: int, *, lrs: Sequence[float], epochs: int, batch_size: int,
    momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Softmax regression by mini-batch SGD with momentum and a per-step cosine schedule, for
    several learning rates at once.

    Each learning rate trains its own classifier on the same seeded sequence of batches; the L
    classifiers are stacked so that one matmul serves them all, which makes a grid search cost
    about as much as one run. The update is exactly `torch.optim.SGD` (momentum, dampening 0,
    weight decay on weights and biases) on the mean cross-entropy; weights start at zero, so the
    result depends on the inputs and the seed alone.

    Args:
        x: (N, D) features; y: (N,) labels in [0, num_classes).
    Returns:
        weights (L, C, D) and biases (L, C), one classifier per learning rate.
    """
    n, d = x.shape
    c, L = num_classes, len(lrs)
    w = x.new_zeros(L * c, d)  # (L*C, D): classifier l is rows [l*C, (l+1)*C)
    b = x.new_zeros(L * c)
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    steps_per_epoch = -(-n // batch_size)
    sched = cosine_lrs(1.0, epochs * steps_per_epoch).tolist()
    lr = torch.tensor([float(v) for v in lrs], dtype=x.dtype, device=x.device).repeat_interleave(c)  # (L*C,)
    eye = torch.eye(c, dtype=x.dtype, device=x.device)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(x.device)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb = x[idx]  # (B, D)
            logits = torch.addmm(b, xb, w.t()).view(-1, L, c)  # (B, L, C)
            # d(mean CE)/d(logits) = (softmax - onehot) / B, for every classifier at once.
            grad = torch.softmax(logits, dim=2).sub_(eye[y[idx]].unsqueeze(1)).div_(xb.shape[0])  # (B, L, C)
            grad = grad.view(-1, L * c)  # (B, L*C)
            gw = grad.t() @ xb  # (L*C, D)
            gb = grad.sum(0)  # (L*C,)
            if weight_decay:
                gw.add_(w, alpha=weight_decay)
                gb.add_(b, alpha=weight_decay)
            mw.mul_(momentum).add_(gw)
            mb.mul_(momentum).add_(gb)
            step_lr = lr * sched[step]  # (L*C,)
            w.sub_(mw * step_lr[:, None])
            b.sub_(mb * step_lr)
            step += 1
    return w.view(L, c, d), b.view(L, c)


@torch.no_grad()
def _accuracy(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> dict[str, float]:
    """Top-1/top-5 (%) of one linear classifier: w (C, D), b (C,)."""
    scores = torch.cat([torch.addmm(b, x[i : i + 8192], w.t()) for i in range(0, x.shape[0], 8192)])  # (M, C)
    return topk_accuracy(scores, y)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int | None = None,
    norm: Norm = "bn",
    lrs: Sequence[float] = (0.001, 0.01, 0.1, 1.0),
    epochs: int = 100,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear classifier on frozen features; top-1/top-5 (%) on the test set.

    With several learning rates, all are trained together (`train_linear`) on a seeded
    (1 - val_fraction) part of the training set and scored on the rest; the best is retrained on
    the whole training set. The normalisation statistics always come from the training features.

    Returns:
        {"top1", "top5", "train_top1", "lr", "val_top1": {lr: %}, "norm", "epochs", "batch_size",
        "momentum", "weight_decay", "time_s"}.
    """
    if epochs < 1 or batch_size < 1 or not lrs or any(lr <= 0 for lr in lrs):
        raise UserError(f"linear probe needs epochs >= 1, batch size >= 1 and lr > 0; got {epochs}, {batch_size}, {list(lrs)}.")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1); got {val_fraction}.")
    t0 = time.perf_counter()
    c = num_classes or int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = train_x.float(), test_x.float()
    kw = dict(epochs=epochs, batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, seed=seed)
    val_scores: dict[float, float] = {}
    if len(lrs) > 1:
        perm = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed + 1))
        n_val = max(1, int(round(val_fraction * train_x.shape[0])))
        val_idx, fit_idx = perm[:n_val], perm[n_val:]
        fn = FeatureNorm.fit(norm, train_x[fit_idx])
        vx = fn(train_x[val_idx])
        ws, bs = train_linear(fn(train_x[fit_idx]), train_y[fit_idx], c, lrs=lrs, **kw)
        for lr, w, b in zip(lrs, ws, bs, strict=True):
            val_scores[float(lr)] = _accuracy(w, b, vx, train_y[val_idx])["top1"]
        best = max(val_scores, key=lambda lr: (val_scores[lr], -lr))
    else:
        best = float(lrs[0])
    fn = FeatureNorm.fit(norm, train_x)
    tx = fn(train_x)
    ws, bs = train_linear(tx, train_y, c, lrs=[best], **kw)
    res = _accuracy(ws[0], bs[0], fn(test_x), test_y)
    return {
        **res, "train_top1": _accuracy(ws[0], bs[0], tx, train_y)["top1"], "lr": best,
        "val_top1": {str(k): v for k, v in val_scores.items()}, "norm": norm, "epochs": epochs,
        "batch_size": batch_size, "momentum": momentum, "weight_decay": weight_decay,
        "time_s": time.perf_counter() - t0,
    }


def probe_augment_config(size: int, mean: Sequence[float], std: Sequence[float]):
    """The augmentation of the usual linear protocol (MoCo, PIC): RandomResizedCrop(0.08-1) + flip."""
    from dataclasses import replace

    from instdisc.augment import identity_config

    return replace(identity_config(size, tuple(mean), tuple(std)), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5)


def linear_probe_augmented(
    subject: Subject,
    train_images,
    test_images,
    *,
    num_classes: int | None = None,
    norm: Literal["bn", "l2"] = "bn",
    lr: float = 0.1,
    epochs: int = 100,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    aug=None,
    progress: bool = False,
) -> dict[str, Any]:
    """Linear probe trained on freshly augmented images through the frozen backbone (slow: one
    backbone forward per image per epoch; meant for GPUs).

    The backbone stays in eval mode (BatchNorm statistics frozen, as DeepCluster and SeLa evaluate;
    PIC's script leaves BN in train mode). "bn" here is a real BatchNorm1d without affine parameters
    before the linear layer (batch statistics while training, running ones at test time); "l2" as
    in `FeatureNorm`. Test images use the deterministic eval transform.
    """
    from instdisc.augment import augment
    from instdisc.loader import TrainLoader
    from instdisc.progress import Progress

    if train_images.labels is None or test_images.labels is None:
        raise UserError("the augmented linear probe needs labelled train and test splits.")
    dev = subject.device
    aug = aug or probe_augment_config(subject.size, subject.mean, subject.std)
    c = num_classes or int(max(train_images.labels.max(), test_images.labels.max())) + 1
    labels = torch.from_numpy(train_images.labels).to(dev)
    dim = int(subject.backbone(torch.zeros(1, 3, subject.size, subject.size, device=dev)).shape[1])
    bn = nn.BatchNorm1d(dim, affine=False).to(dev) if norm == "bn" else nn.Identity()
    lin = nn.Linear(dim, c).to(dev)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    head = nn.Sequential(bn, lin)
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = TrainLoader(train_images, min(batch_size, len(train_images)), seed=seed, device=dev, workers=subject.workers)
    spe = loader.steps_per_epoch()
    lrs = cosine_lrs(lr, epochs * spe)
    t0, step = time.perf_counter(), 0
    bar = Progress(epochs * spe, desc="linear (augmented)", enabled=progress)
    for epoch in range(epochs):
        head.train()
        for x, idx in loader.epoch(epoch):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            with torch.no_grad():
                f = subject.backbone(augment(x, aug, gen)).float()  # (b, dim), frozen
                if norm == "l2":
                    f = F.normalize(f, dim=1) * math.sqrt(dim)
            for group in opt.param_groups:
                group["lr"] = float(lrs[step])
            loss = F.cross_entropy(head(f), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
    bar.close()
    head.eval()
    test_f = extract(subject, test_images, "backbone")
    if norm == "l2":
        test_f = F.normalize(test_f, dim=1) * math.sqrt(dim)
    with torch.no_grad():
        scores = head.cpu()(test_f)  # (M, C)
    res = topk_accuracy(scores, torch.from_numpy(test_images.labels))
    return {**res, "lr": lr, "norm": norm, "epochs": epochs, "batch_size": batch_size, "momentum": momentum,
            "weight_decay": weight_decay, "augmentation": "RandomResizedCrop(0.08-1) + flip",
            "time_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# Low-shot
# --------------------------------------------------------------------------------------------


def sample_per_class(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k random images of every class present (without replacement), sorted."""
    picks = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c in np.unique(labels)]
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

    if draws < 1 or C <= 0 or not shots or min(shots) < 1:
        raise UserError(f"low-shot needs draws >= 1, C > 0 and shots >= 1; got {draws}, {C}, {list(shots)}.")
    ty = train_y.numpy()
    smallest = int(np.bincount(ty)[np.unique(ty)].min())
    rows: list[dict[str, Any]] = []
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
                raise ConfigError(f"unknown low-shot classifier {classifier!r}; choose svm or logreg.")
            if len(np.unique(ty[idx])) < 2:
                raise UserError("low-shot needs at least two classes.")
            clf.fit(xs, ty[idx])
            runs.append(100.0 * float((clf.predict(xq) == test_y.numpy()).mean()))
        rows.append({"k": k, "mean": float(np.mean(runs)), "std": float(np.std(runs)), "runs": runs,
                     "n_train": int(len(idx))})
    return rows


# --------------------------------------------------------------------------------------------
# Per-stage
# --------------------------------------------------------------------------------------------


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
    prefix = "conv" if len(train_stages) == 5 else "layer"  # AlexNet's five conv blocks, ResNet's four stages
    for s, (tr, te) in enumerate(zip(train_stages, test_stages, strict=True)):
        lin = linear_probe(tr, train_y, te, test_y, num_classes=num_classes, **probe_kw)
        knn = knn_table(tr, train_y, te, test_y, ks=(knn_k,), ts=(knn_t,), num_classes=num_classes)[0]
        rows.append({"stage": f"{prefix}{s + 1}", "dim": int(tr.shape[1]), "linear_top1": lin["top1"],
                     "linear_top5": lin["top5"], "lr": lin["lr"], "knn_top1": knn["top1"]})
    return rows

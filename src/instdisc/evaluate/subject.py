"""What is evaluated: a run's model or published weights, as a `Subject` (the frozen model,
its embedding and backbone, and the eval transform its features need). `load_subject` reads a run
directory or an instdisc checkpoint (through `instdisc.methods.load_run`'s functions, as
``--resume`` does) or a released checkpoint (`instdisc.published`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from instdisc.errors import CheckpointError, UserError


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
        test_data: the run's --test-data (its evaluation source when no --data is given), if any.
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
    test_data: str | None = None
    image_size: int | None = None
    workers: int = 4
    cache_dir: str | None = None
    run_dir: Path | None = None
    fingerprint: str = ""
    config: dict[str, Any] = field(default_factory=dict)


def require_finite_weights(module: nn.Module, where: str) -> None:
    """Refuse weights holding NaN or infinity: every feature computed from them would be NaN
    (or garbage), and the protocols would still print a plausible chance-level score."""
    # Parameters and normalisation statistics; other buffers may hold NaN on purpose (NPID's log Z
    # before it is estimated) and do not enter the features.
    tensors = [*module.named_parameters(), *((n, b) for n, b in module.named_buffers() if "running_" in n)]
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"the weights of {where} are not finite: {name} holds NaN or infinite values. Nothing "
                "evaluated with them would mean anything; use another checkpoint (a run keeps the previous "
                "one as checkpoints/prev.pt)."
            )


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def load_subject(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    layout: str | None = None,
    published_ok: bool = True,
) -> Subject:
    """A run directory, an instdisc checkpoint or a published checkpoint -> `Subject`.

    Args:
        path: RUN_DIR, RUN_DIR/checkpoints/last.pt, or a released .pth/.pth.tar (see published.py).
        device: auto | cpu | cuda | cuda:N.
        layout: force a published layout (published.LAYOUTS); default: detect.
        published_ok: False: only runs and instdisc checkpoints (anything else is "not an
            instdisc checkpoint").
    """
    from instdisc import published
    from instdisc.checkpoint import find_checkpoint
    from instdisc.dist import resolve_device
    from instdisc.methods.build import read_run

    dev = resolve_device(device)
    p = Path(path)
    if layout is None and (p.is_dir() or not published_ok):
        _, ck = read_run(p)
        if p.is_file():
            run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
            return _subject_from_run(ck, p, dev, run_dir=run_dir)
        return _subject_from_run(
            ck, find_checkpoint(p), dev, run_dir=p.parent if p.name == "checkpoints" else p
        )
    if layout is not None and p.is_dir():
        raise UserError(f"--layout {layout} is for released weights (a checkpoint file); {str(p)!r} is a run "
                        "directory, whose layout is known: leave --layout out.")
    if not p.is_file():
        raise UserError(f"{str(p)!r} is neither a run directory nor a checkpoint file.")
    obj = published.read_weights(p)
    if layout is None and published.is_instdisc_checkpoint(obj):
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
        return _subject_from_run(obj, p, dev, run_dir=run_dir)
    model = published.load_published(obj, layout=layout, source=str(p)).to(dev).eval()
    require_finite_weights(model, repr(str(p)))
    mean, std = model.norm_stats
    return Subject(
        name=f"{p.name} ({model.layout}, {model.arch})",
        module=model,
        embed=model.embed,
        backbone=model.backbone,
        size=model.input_size,
        mean=mean,
        std=std,
        device=dev,
        fingerprint=_fingerprint(p),
        config={"published_layout": model.layout, "arch": model.arch},
    )


def _subject_from_run(
    ck: dict[str, Any], ck_path: Path, dev: torch.device, *, run_dir: Path | None
) -> Subject:
    from instdisc.methods.build import method_from_checkpoint

    method, cfg = method_from_checkpoint(ck, dev, where=f"checkpoint {str(ck_path)!r}")
    require_finite_weights(method, repr(str(ck_path)))
    name = run_dir.name if run_dir is not None else ck_path.name
    return subject_of(method, cfg, dev, name=name, run_dir=run_dir, fingerprint=_fingerprint(ck_path))


def subject_of(
    method: nn.Module,
    cfg: Any,
    device: torch.device,
    *,
    name: str = "model",
    run_dir: Path | None = None,
    fingerprint: str = "",
) -> Subject:
    """A method (trained, loaded or just built) and its `TrainConfig` -> `Subject`, evaluated with
    the run's own eval transform and data. The training loop's kNN and the demo judge a model in
    memory this way, through the same functions as a checkpoint."""
    a = cfg.aug
    return Subject(
        name=f"{name} ({cfg.run.method}, {cfg.model.arch} w{cfg.model.width})",
        module=method,
        embed=method.embed,
        backbone=method.backbone,
        size=a.size,
        mean=tuple(a.mean),
        std=tuple(a.std),
        device=torch.device(device),
        data=cfg.data.data,
        test_data=cfg.data.test_data,
        image_size=cfg.data.image_size,
        workers=cfg.data.workers,
        cache_dir=cfg.data.cache_dir,
        run_dir=run_dir,
        fingerprint=fingerprint,
        config=cfg.to_dict(),
    )


def stage_dims(subject: Subject) -> tuple[int, ...]:
    dims = getattr(subject.backbone, "stage_dims", None)
    if dims is None or not hasattr(subject.backbone, "forward_stages"):
        raise UserError(
            f"the backbone of {subject.name} has no per-stage features (only ResNets do)."
        )
    return tuple(dims)

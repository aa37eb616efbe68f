"""Building a method: from a config (a new run), or from a run directory (config + checkpoint).

`load_run` is the one way a saved run becomes a model again: ``--resume``, every evaluation
command (through `instdisc.evaluate.load_subject`), the demo and the benchmarks call it. It lives
here, next to the methods, so that evaluation never imports the training engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from instdisc.config import TrainConfig
from instdisc.dist import resolve_device
from instdisc.errors import CheckpointError
from instdisc.methods.base import Method


def build_method(cfg: TrainConfig, num_samples: int) -> Method:
    """Backbone + method from the config alone, freshly initialised (seed the generators first)."""
    from instdisc.methods import METHODS
    from instdisc.models import build_backbone

    # Size-dependent hyper-parameters left unset are chosen for N here, in the config, before the
    # method sees it (the training loop does it earlier, with the class count, and says so; kept
    # values are never changed). Constructors only check.
    fill = getattr(cfg.method, "fill_defaults", None)
    if fill is not None:
        fill(num_samples)
    backbone, feat_dim = build_backbone(cfg.model.arch, width=cfg.model.width, cifar_stem=cfg.model.cifar_stem)
    return METHODS[cfg.run.method](backbone, feat_dim, num_samples, cfg.method)


def read_run(path: str | Path, *, quarantine: bool = False) -> tuple[TrainConfig, dict[str, Any]]:
    """A run directory, its checkpoints/ folder or a checkpoint file -> (its TrainConfig, the
    checkpoint dict), without building anything. See `instdisc.checkpoint.load_checkpoint` for
    the fallback to prev.pt and ``quarantine``."""
    from instdisc.checkpoint import load_checkpoint

    ck = load_checkpoint(path, quarantine=quarantine)
    from instdisc.methods import config_from_dict

    return config_from_dict(ck["config"]), ck


def method_from_checkpoint(ck: dict[str, Any], device: str | torch.device = "cpu", *,
                           where: str = "the checkpoint") -> tuple[Method, TrainConfig]:
    """An already read checkpoint -> (its method with the saved weights and buffers, on `device`,
    in eval mode; its TrainConfig)."""
    from instdisc.methods import config_from_dict

    cfg = config_from_dict(ck["config"])
    method = build_method(cfg, int(ck["num_samples"]))
    try:
        method.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{where} does not match its own config: {str(e).splitlines()[0]}") from None
    return method.to(resolve_device(device)).eval(), cfg


def load_run(
    path: str | Path, device: str | torch.device = "cpu", *, quarantine: bool = False
) -> tuple[Method, TrainConfig, dict[str, Any]]:
    """A saved run -> (method, cfg, checkpoint).

    Args:
        path: RUN_DIR, RUN_DIR/checkpoints, or a checkpoint file (last.pt, prev.pt, a copy).
        device: where the method goes (``auto``: cuda when available).
        quarantine: on a damaged last.pt, rename it when falling back to prev.pt (``--resume``).

    Returns:
        The method, built from the checkpoint's own config with its saved weights and buffers, on
        `device` and in eval mode; that `TrainConfig`; the checkpoint dict (optimizer, loop state,
        data fingerprint...).

    Raises:
        UserError: no checkpoint there; CheckpointError: unreadable, or not matching its config.
    """
    from instdisc.checkpoint import find_checkpoint

    _, ck = read_run(path, quarantine=quarantine)
    method, cfg = method_from_checkpoint(ck, device, where=f"checkpoint {str(find_checkpoint(path))!r}")
    return method, cfg, ck

"""The Python API: a trained model as a feature extractor.

    >>> import instdisc
    >>> enc = instdisc.load("runs/digits")          # a run, a checkpoint or released weights
    >>> z = enc(enc.preprocess(pil_image))           # (1, D), unit rows
    >>> out = instdisc.embed(enc, "digits", split="test")
    >>> out.features.shape, out.labels, out.paths    # (N, D), (N,) or None, N names or None

`load` goes through `evaluate.load_subject` (the one loader of runs and released weights) and
`embed` through `features.extract_features` (the one function that embeds an image set), so the
features are those `instdisc embed` and the evaluation commands compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from instdisc.errors import UserError

__all__ = ["Embedding", "Encoder", "embed", "load"]


class Encoder(nn.Module):
    """A trained model and its eval transform.

    ``enc(x)`` gives the model's embedding, ``(B, D)`` L2-normalised fp32 (the features its kNN
    used), for ``x`` either preprocessed float images ``(B, 3, size, size)`` or anything
    `preprocess` takes (uint8 tensors or arrays, PIL images), which it preprocesses first.
    ``enc.backbone`` maps preprocessed images to the pooled backbone features ``(B, F)``.

    Attributes:
        model: the method (or released model) in eval mode.
        size, mean, std: the eval transform: short side resized to ``size``, centre crop, [0, 1],
            then ``(x - mean) / std``.
        name: what was loaded.
    """

    def __init__(self, subject: Any) -> None:
        super().__init__()
        self.model = subject.module
        self._embed = subject.embed  # a bound method of self.model, so it follows .to(device)
        self.size: int = subject.size
        self.mean: tuple[float, float, float] = tuple(subject.mean)
        self.std: tuple[float, float, float] = tuple(subject.std)
        self.name: str = subject.name
        self.subject = subject  # how the run opens its data (image size, cache), for `embed`
        self.eval()

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Any) -> Tensor:
        """PIL image(s), uint8 ``(3, H, W)`` / ``(B, 3, H, W)`` tensors or ``(H, W, 3)`` /
        ``(B, H, W, 3)`` arrays -> ``(B, 3, size, size)`` float32, normalised, on the model's device."""
        from instdisc.augment import preprocess

        x = _as_uint8_batch(images)
        return preprocess(x.to(self.device), self.size, mean=self.mean, std=self.std)

    def forward(self, x: Any) -> Tensor:
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            x = self.preprocess(x)
        elif x.ndim != 4 or x.shape[1] != 3 or 0 in x.shape:  # else a conv error that names none of this
            raise UserError(f"enc(x): a float tensor is a batch of preprocessed images (B, 3, H, W); got "
                            f"{tuple(x.shape)} (enc.preprocess takes uint8 tensors, arrays and PIL images).")
        with torch.no_grad():
            return self._embed(x.to(self.device))  # (B, D), unit rows


def _as_uint8_batch(images: Any) -> Tensor:
    """The accepted image inputs -> (B, 3, H, W) uint8 tensor."""
    from PIL import Image

    from instdisc.sources.images import to_rgb

    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        # the data sources' conversion (16-bit grey scaled, not clipped; palette transparency), so
        # an image given here embeds as the same file read by `instdisc embed` or `search`
        arrays = [np.asarray(to_rgb(i)) for i in images]
        if len({a.shape for a in arrays}) != 1:
            raise UserError("preprocess: PIL images of different sizes; pass them one at a time.")
        images = np.stack(arrays)  # (B, H, W, 3)
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
            raise UserError(f"preprocess: arrays must be uint8 (H, W, 3) or (B, H, W, 3); got {images.dtype} "
                            f"{images.shape}.")
        t = torch.from_numpy(np.ascontiguousarray(images) if images.flags.writeable else images.copy())
        t = t[None] if t.ndim == 3 else t
        if 0 in t.shape:
            raise UserError(f"preprocess: an image with no pixels, {tuple(images.shape)}.")
        return t.permute(0, 3, 1, 2)
    if isinstance(images, Tensor):
        if images.dtype != torch.uint8 or images.ndim not in (3, 4) or images.shape[-3] != 3:
            raise UserError(f"preprocess: tensors must be uint8 (3, H, W) or (B, 3, H, W); got {images.dtype} "
                            f"{tuple(images.shape)} (float tensors go to enc(x) as preprocessed images).")
        images = images[None] if images.ndim == 3 else images
        if 0 in images.shape:  # nothing to resize: a ZeroDivisionError in the transform otherwise
            raise UserError(f"preprocess: an image with no pixels, {tuple(images.shape)}.")
        return images
    raise UserError(f"preprocess: expected PIL images, uint8 tensors or uint8 arrays; got {type(images).__name__}.")


def load(path: str | Path, *, device: str = "auto", layout: str | None = None) -> Encoder:
    """A run directory, an instdisc checkpoint or released NPID/PIC/SeLa weights -> `Encoder`.

    Args:
        path: RUN_DIR, a ``.pt`` checkpoint, or a released file (`instdisc weights` lists layouts).
        device: auto | cpu | cuda | cuda:N.
        layout: force the layout of released weights (default: detected).
    """
    from instdisc.evaluate import load_subject

    return Encoder(load_subject(path, device=device, layout=layout))


@dataclass
class Embedding:
    """Features of one image set, row i = image i.

    Attributes:
        features: ``(N, D)`` float32, L2-normalised (or ``(N, F)`` backbone features).
        labels: ``(N,)`` int64, or None for unlabelled sources.
        paths: the source file of each row, or None where the source has no files.
        classes: class names in label order.
    """

    features: Tensor
    labels: np.ndarray | None
    paths: list[str] | None
    classes: list[str]


def embed(enc: Encoder, data: Any = None, *, split: str = "test", backbone: bool = False, batch_size: int = 256,
          cache_dir: str | None = None, workers: int = 0, progress: bool = False) -> Embedding:
    """Embed every image of a source with `enc`.

    Args:
        enc: from `load`.
        data: a source spec (``"digits"``, ``"cifar10"``, a folder, an archive; see `sources`), an
            `ImageSet`, or None for the run's own training source.
        split: ``"train"`` or ``"test"`` (for a spec).
        backbone: pooled backbone features instead of the embedding.
    """
    from instdisc.evaluate import open_images
    from instdisc.features import extract_features
    from instdisc.sources import ImageSet

    if split not in ("train", "test"):  # anything else used to embed a split the caller did not name
        raise UserError(f"embed: split must be 'train' or 'test'; got {split!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"embed: batch_size must be an integer >= 1; got {batch_size!r}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(f"embed: workers must be an integer >= 0; got {workers!r}.")

    images = data if isinstance(data, ImageSet) else open_images(
        enc.subject, None if data is None else str(data), split, cache_dir=cache_dir, progress=progress)
    fn = enc.backbone if backbone else enc._embed
    with torch.no_grad():
        feats = extract_features(fn, images, size=enc.size, mean=enc.mean, std=enc.std, batch_size=batch_size,
                                 device=enc.device, workers=workers, progress=progress)
    return Embedding(feats.cpu(), images.labels, images.paths(), list(images.classes))

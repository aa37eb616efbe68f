"""Batched, per-sample random augmentation of uint8 image tensors, on the batch's own device.

Instance discrimination learns whatever the augmentations leave invariant, so the recipe *is* the
method as much as the loss is. The papers used torchvision's PIL transforms in data-loader worker
processes; that costs far more CPU than the network on small images and cannot run on the GPU. Here
the whole batch is augmented at once with a handful of tensor ops:

1. ``RandomResizedCrop`` + horizontal flip as ONE bilinear ``F.grid_sample`` per batch (the flip is
   a mirrored sampling grid, so it costs nothing extra). Same crop-box distribution as torchvision
   and the same pixels as ``F.interpolate(bilinear, align_corners=False)`` of the box; like
   ``interpolate`` without ``antialias``, a crop shrunk by more than ~2x aliases (torchvision's PIL
   path antialiases). CIFAR crops are never shrunk. Large images (ImageNet) are cropped at decode
   time instead, in the DataLoader workers, with the same box distribution (`crop_boxes`) on the
   whole stored image and an antialiased resize (`instdisc.loader`); ``augment(..., cropped=True)``
   then starts at the flip;
2. colour jitter in the fixed order brightness -> contrast -> saturation -> hue (torchvision draws a
   random order per image; a fixed order keeps the batch vectorised, and the distribution of
   outputs is very close). Hue is rotated in HSV, exactly as torchvision's ``adjust_hue``;
3. random grayscale;
4. Gaussian blur (separable, one sigma per image);
5. solarisation;
6. normalisation with the dataset mean/std.

NPID's released code applies grayscale *before* the jitter on ImageNet and after it on CIFAR; here
it is after (as MoCo v2 / SimCLR). Either way a selected image ends up grey; the order only changes
whether the saturation/hue jitter shifts its grey levels.

Every image gets its own parameters. All randomness is drawn by :func:`sample_params` from a single
``torch.Generator`` in one call (a fixed number of draws per batch, whichever augmentations are on),
so a run is reproducible from ``(seed, step)``; with a CPU generator the parameters are also identical
whatever device the images are on.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> views = augment(images_uint8, AugmentConfig(), g)      # (B, 3, 32, 32) float32
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CROP_UNIFORMS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "adjust_hue",
    "augment",
    "apply_params",
    "blur_kernel_size",
    "crop_boxes",
    "hsv_to_rgb",
    "identity_config",
    "preprocess",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "sample_params",
]

# NPID's CIFAR normalisation (lemniscate.pytorch cifar.py). The std is the per-pixel-std variant that
# circulates in CIFAR code, not the true per-channel std (~0.247, 0.243, 0.261); kept for parity.
CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# ITU-R 601-2 luma weights, as used by PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)

# RandomResizedCrop draws up to this many (scale, ratio) pairs before falling back to a centre crop.
_CROP_TRIES = 10

# Column layout of the single (B, _N_UNIFORM) block of uniforms drawn per batch. Keeping the count
# fixed means the generator advances by the same amount whatever the config, so turning one
# augmentation on or off never reshuffles the parameters of the others.
_U_SCALE = slice(0, _CROP_TRIES)
_U_RATIO = slice(_CROP_TRIES, 2 * _CROP_TRIES)
_U_POS = slice(2 * _CROP_TRIES, 2 * _CROP_TRIES + 2)  # (top, left)
_U_FLIP = 2 * _CROP_TRIES + 2
_U_JITTER = slice(2 * _CROP_TRIES + 3, 2 * _CROP_TRIES + 7)  # brightness, contrast, saturation, hue
_U_JITTER_P = 2 * _CROP_TRIES + 7
_U_GRAY = 2 * _CROP_TRIES + 8
_U_BLUR_SIGMA = 2 * _CROP_TRIES + 9
_U_BLUR_P = 2 * _CROP_TRIES + 10
_U_SOLARIZE = 2 * _CROP_TRIES + 11
_N_UNIFORM = 2 * _CROP_TRIES + 12
CROP_UNIFORMS = 2 * _CROP_TRIES + 2
"""Uniforms per image that `crop_boxes` reads (its leading columns: scales, ratios, position)."""


@dataclass
class AugmentConfig:
    """Augmentation recipe. The defaults are the NPID (Wu et al., 2018) recipe.

    NPID's released code (lemniscate.pytorch) uses ``RandomResizedCrop(scale=(0.2, 1))``,
    ``ColorJitter(0.4, 0.4, 0.4, 0.4)``, ``RandomGrayscale(p=0.2)`` and, for ImageNet, a horizontal
    flip. Two deliberate differences in the defaults: ``jitter_p`` is 0.8 (NPID applied the jitter to
    every image; 0.8 is the MoCo v2 / SimCLR / PIC value; set 1.0 for strict NPID parity) and
    ``flip_p`` is 0.5 (NPID's cifar.py has the flip commented out; its ImageNet script uses it).

    Attributes:
        size: Output side in pixels; outputs are square ``size x size``. 32 for CIFAR, 224 for
            ImageNet.
        scale: Range of the crop's area as a fraction of the input area (RandomResizedCrop).
            NPID/MoCo/PIC use (0.2, 1.0); SimCLR (0.08, 1.0). A small lower bound is what makes two
            views of one image hard to match, i.e. what forces semantic features.
        ratio: Range of the crop's aspect ratio (width / height), sampled log-uniformly. (3/4, 4/3)
            everywhere.
        flip_p: Probability of a horizontal flip (0.5 in every paper that flips).
        jitter_p: Probability that colour jitter is applied to an image (0.8 in MoCo v2, SimCLR, PIC;
            NPID used 1.0). Colour jitter stops the network from solving the task by colour
            histogram alone.
        brightness: Brightness factor drawn from ``[max(0, 1 - b), 1 + b]`` (NPID 0.4; SimCLR
            0.8 * strength; MoCo v2 0.4).
        contrast: Contrast factor drawn from ``[max(0, 1 - c), 1 + c]`` (NPID 0.4).
        saturation: Saturation factor drawn from ``[max(0, 1 - s), 1 + s]`` (NPID 0.4).
        hue: Hue shift drawn from ``[-h, h]`` in turns (fractions of the colour wheel), h <= 0.5
            (NPID 0.4; MoCo v2 0.1; SimCLR 0.2).
        grayscale_p: Probability of converting an image to grayscale (replicated on 3 channels);
            0.2 in NPID, MoCo v2, SimCLR, PIC.
        blur_p: Probability of a Gaussian blur. NPID: 0; MoCo v2 / PIC: 0.5; SimCLR: 0.5 on ImageNet
            but off on CIFAR (blurring a 32 px image destroys most of it). The kernel side is
            ~10% of ``size`` (see :func:`blur_kernel_size`), as in SimCLR.
        blur_sigma: Range of the blur's standard deviation in pixels, drawn uniformly per image
            ((0.1, 2.0) in SimCLR and MoCo v2).
        solarize_p: Probability of solarising (inverting pixels >= 0.5). Not in NPID/MoCo/SimCLR;
            BYOL uses 0.2 on one view. Off by default.
        mean: Per-channel mean for normalisation (in [0, 1] units).
        std: Per-channel std for normalisation.
    """

    size: int = 32
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.4
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD

    def __post_init__(self) -> None:
        # Accept lists (YAML/JSON configs) but store tuples so configs stay hashable and comparable.
        self.scale = tuple(float(v) for v in self.scale)  # type: ignore[assignment]
        self.ratio = tuple(float(v) for v in self.ratio)  # type: ignore[assignment]
        self.blur_sigma = tuple(float(v) for v in self.blur_sigma)  # type: ignore[assignment]
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Check ranges; raises ``ValueError`` naming the offending field by its command-line
        flag (``--aug-<field>``), which is how users set it."""

        def _pair(name: str, lo_min: float) -> None:
            lo, hi = getattr(self, name)
            if not (lo_min <= lo <= hi):
                raise ValueError(f"--aug-{name.replace('_', '-')} must satisfy {lo_min} <= lo <= hi, got {(lo, hi)}")

        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"--aug-size must be a positive integer, got {self.size!r}")
        _pair("scale", 0.0)
        if self.scale[1] <= 0:
            raise ValueError(f"--aug-scale upper bound must be > 0, got {self.scale}")
        _pair("ratio", 1e-6)
        _pair("blur_sigma", 1e-6)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"--aug-{name.replace('_', '-')} must be in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"--aug-{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"--aug-hue must be in [0, 0.5], got {self.hue}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"--aug-mean/--aug-std must be 3 values with std > 0, got {self.mean}, {self.std}")


def identity_config(
    size: int,
    mean: tuple[float, float, float] = CIFAR_MEAN,
    std: tuple[float, float, float] = CIFAR_STD,
) -> AugmentConfig:
    """An :class:`AugmentConfig` with every augmentation disabled.

    With a square ``size x size`` input, ``augment(x, identity_config(size))`` equals
    ``preprocess(x, size)`` exactly. With a non-square input the aspect ratio (1, 1) cannot be met by
    a full-image crop, so the crop falls back to the centre square, which again equals
    ``preprocess(x, min(H, W))``.

    Args:
        size: Output side.
        mean: Normalisation mean.
        std: Normalisation std.

    Returns:
        The config.
    """
    return AugmentConfig(
        size=size,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        hue=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
        mean=mean,
        std=std,
    )


def blur_kernel_size(size: int) -> int:
    """Side of the Gaussian kernel for an output of side ``size``: ~10% of it, odd, at least 3.

    SimCLR uses ``int(0.1 * size)`` made odd (23 for 224); 3 for 32 px images.
    """
    k = int(0.1 * size)
    if k % 2 == 0:
        k += 1
    return max(k, 3)


# --------------------------------------------------------------------------------------------------
# Parameter sampling
# --------------------------------------------------------------------------------------------------


def _uniform(u: Tensor, lo: float, hi: float) -> Tensor:
    """Map U[0, 1) draws to U[lo, hi)."""
    return lo + (hi - lo) * u


def crop_boxes(
    u: Tensor,
    height: int | Tensor,
    width: int | Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Tensor:
    """torchvision's ``RandomResizedCrop.get_params``, vectorised over a batch of images.

    The distribution of Szegedy et al. (2015, "Going deeper with convolutions"), as torchvision
    draws it: up to ``_CROP_TRIES`` candidates of area ``U(scale) * H * W`` and aspect ratio
    (width / height) ``exp(U(log ratio))``, side lengths rounded half to even; the first candidate
    that fits wins and is placed uniformly over the valid integer offsets. An image for which none
    fits gets the fallback: the largest centred box whose aspect ratio is clamped into ``ratio``
    (the whole image when its own ratio is inside). The uniforms are drawn up front (a fixed count
    per image), so the result is a pure function of ``u`` and the image sizes.

    Args:
        u: (B, >= 2 * _CROP_TRIES + 2) uniforms in [0, 1): columns ``_U_SCALE``, ``_U_RATIO`` and
            ``_U_POS``; other columns are ignored. Computed in ``u``'s dtype (float64 for large
            images keeps every box exact to the pixel).
        height: H, one int for the whole batch or a (B,) tensor (one per image).
        width: W, likewise.
        scale: (lo, hi) area fraction.
        ratio: (lo, hi) aspect ratio.

    Returns:
        (B, 4) int64 boxes ``(top, left, h, w)`` in input pixels, with ``0 < h <= H``, ``0 < w <= W``.
    """
    per_image = isinstance(height, Tensor) or isinstance(width, Tensor)
    if per_image:
        hh = torch.as_tensor(height, device=u.device).to(u.dtype).reshape(-1, 1)  # (B, 1)
        ww = torch.as_tensor(width, device=u.device).to(u.dtype).reshape(-1, 1)
        area: Tensor | float = hh * ww  # (B, 1)
        hmax, wmax = hh.squeeze(1), ww.squeeze(1)  # (B,)
    else:
        area = float(height * width)
        hh = ww = None
        hmax, wmax = float(height), float(width)
    target_area = area * _uniform(u[:, _U_SCALE], *scale)  # (B, T)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(_uniform(u[:, _U_RATIO], log_lo, log_hi))  # (B, T)
    # torch.round rounds half to even, like Python's round() used by torchvision.
    w = torch.round(torch.sqrt(target_area * aspect))  # (B, T)
    h = torch.round(torch.sqrt(target_area / aspect))  # (B, T)
    lim_w = width if not per_image else ww
    lim_h = height if not per_image else hh
    fits = (w > 0) & (w <= lim_w) & (h > 0) & (h <= lim_h)  # (B, T)
    # argmax returns the first maximal index, i.e. the first try that fits (0 if none fits).
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1)
    ok = fits.any(dim=1)  # (B,)
    w = w.gather(1, first).squeeze(1)  # (B,)
    h = h.gather(1, first).squeeze(1)

    fh, fw = _fallback_sides(height, width, ratio, u)  # scalars, or (B,) tensors
    w = torch.where(ok, w, fw)
    h = torch.where(ok, h, fh)

    # Position: uniform over the valid integer offsets (torchvision: randint(0, H - h + 1)).
    pos = u[:, _U_POS]  # (B, 2)
    top = torch.minimum(torch.floor(pos[:, 0] * (hmax - h + 1)), hmax - h)
    left = torch.minimum(torch.floor(pos[:, 1] * (wmax - w + 1)), wmax - w)
    top = torch.where(ok, top, torch.floor((hmax - fh) / 2))
    left = torch.where(ok, left, torch.floor((wmax - fw) / 2))
    return torch.stack((top, left, h, w), dim=1).to(torch.int64)


def _fallback_sides(
    height: int | Tensor, width: int | Tensor, ratio: tuple[float, float], like: Tensor
) -> tuple[Tensor, Tensor]:
    """Sides (h, w) of get_params' fallback box: the image, its aspect ratio clamped into ``ratio``.

    Returns two tensors of ``like``'s dtype and device: 0-d for int sizes, (B,) for per-image ones.
    """
    hh = torch.as_tensor(height, dtype=torch.float64).to(like.device)
    ww = torch.as_tensor(width, dtype=torch.float64).to(like.device)
    in_ratio = ww / hh
    tall, wide = in_ratio < ratio[0], in_ratio > ratio[1]
    # Too tall: full width, height w / min ratio; too wide: full height, width h * max ratio.
    fw = torch.where(wide, torch.round(hh * ratio[1]), ww)
    fh = torch.where(tall, torch.round(ww / ratio[0]), hh)
    fh = torch.minimum(fh.clamp(min=1), hh)
    fw = torch.minimum(fw.clamp(min=1), ww)
    return fh.to(like.dtype), fw.to(like.dtype)


def _crop_boxes(u: Tensor, height: int, width: int, cfg: AugmentConfig) -> Tensor:
    """`crop_boxes` with the config's scale and ratio (one input size for the whole batch)."""
    return crop_boxes(u, height, width, cfg.scale, cfg.ratio)


def sample_params(
    batch: int,
    height: int,
    width: int,
    cfg: AugmentConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Draw per-image augmentation parameters for a batch.

    All randomness comes from ONE ``torch.rand`` call of fixed shape ``(batch, N)`` on the
    generator's device, so the draw is reproducible from the generator state and independent of
    which augmentations are enabled. The parameters are computed there and then moved to ``device``.

    Args:
        batch: Number of images B.
        height: Input height H.
        width: Input width W.
        cfg: Augmentation config.
        generator: Source of randomness (CPU or on-device). ``None`` uses torch's global CPU RNG.
        device: Where the returned tensors live (default: the generator's device).

    Returns:
        Dict of per-image tensors:

        - ``crop``: (B, 4) int64 ``(top, left, h, w)`` boxes in input pixels.
        - ``flip``: (B,) bool, mirror horizontally.
        - ``jitter``: (B, 4) float32 ``(brightness, contrast, saturation, hue_shift)``; the first
          three are multiplicative factors in ``[max(0, 1 - v), 1 + v]``, the hue shift is in turns
          in ``[-hue, hue]``. Drawn for every image; only used where ``jitter_mask``.
        - ``jitter_mask``: (B,) bool, apply colour jitter.
        - ``gray_mask``: (B,) bool, convert to grayscale.
        - ``blur_sigma``: (B,) float32 Gaussian sigma in output pixels.
        - ``blur_mask``: (B,) bool, apply the blur.
        - ``solarize_mask``: (B,) bool, solarise.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, _N_UNIFORM, generator=generator, device=gen_device)  # (B, N)

    jit = u[:, _U_JITTER]  # (B, 4)
    factors = [
        _uniform(jit[:, k], max(0.0, 1.0 - v), 1.0 + v)
        for k, v in enumerate((cfg.brightness, cfg.contrast, cfg.saturation))
    ]
    factors.append(_uniform(jit[:, 3], -cfg.hue, cfg.hue))
    params = {
        "crop": _crop_boxes(u, height, width, cfg),
        "flip": u[:, _U_FLIP] < cfg.flip_p,
        "jitter": torch.stack(factors, dim=1),
        "jitter_mask": u[:, _U_JITTER_P] < cfg.jitter_p,
        "gray_mask": u[:, _U_GRAY] < cfg.grayscale_p,
        "blur_sigma": _uniform(u[:, _U_BLUR_SIGMA], *cfg.blur_sigma),
        "blur_mask": u[:, _U_BLUR_P] < cfg.blur_p,
        "solarize_mask": u[:, _U_SOLARIZE] < cfg.solarize_p,
    }
    if device is not None and torch.device(device) != gen_device:
        params = {k: v.to(device, non_blocking=True) for k, v in params.items()}
    return params


# --------------------------------------------------------------------------------------------------
# Constants, scratch buffers, conversion
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _const(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant tensor, cached per (values, device, dtype). Never modify the result.

    Building tensors from Python tuples costs a host->device copy (and ~10 us on CPU) each time;
    the pipeline needs several per batch. Created outside inference mode so that a constant first
    made under ``torch.inference_mode()`` stays usable everywhere.
    """
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


class _ScratchBuffers(threading.local):
    """Per-thread reusable CPU buffers for the pipeline's large temporaries.

    On CPU, every fresh multi-megabyte temporary costs page faults (glibc returns big freed blocks
    to the OS, and the next allocation touches new pages), which on a VM costs more than the
    arithmetic itself: reusing buffers across calls makes augmentation ~1.5x faster. Only
    intermediates live here, never anything returned to the caller. Thread-local so that
    concurrent callers never share a buffer. GPUs have a caching allocator and skip this.
    """

    def __init__(self) -> None:
        self.bufs: dict[str, Tensor] = {}


_SCRATCH = _ScratchBuffers()
# Buffers above this size are allocated normally (e.g. ImageNet-sized batches), so the cache never
# pins much memory: at CIFAR sizes it holds ~12 MB per thread for a batch of 256.
_SCRATCH_MAX_BYTES = 64 << 20


def _scratch(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype/device, reused across calls on CPU.

    The caller must not return it (or a view of it) and must not request the same ``name`` twice
    while the first one is still in use.
    """
    return _scratch_of(name, shape, like.dtype, like.device)


def _scratch_of(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`_scratch` with an explicit dtype and device."""
    n = math.prod(shape)
    if device.type != "cpu" or n * dtype.itemsize > _SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = _SCRATCH.bufs.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        # Never an inference tensor, even when first created under torch.inference_mode():
        # those could not be updated in place by a later call outside inference mode.
        with torch.inference_mode(False):
            buf = torch.empty(n, dtype=dtype)
        _SCRATCH.bufs[name] = buf
    return buf[:n].view(shape)


def _to_unit_float(x: Tensor, *, scratch: bool = False) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is taken to be in [0, 1] and copied.

    Args:
        x: (B, 3, H, W) images.
        scratch: Write into a reusable scratch buffer (the result must then not escape).

    Returns:
        (B, 3, H, W) float32, never aliasing ``x``.
    """
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
    if scratch:
        y = _scratch_of("input", tuple(x.shape), torch.float32, x.device)
    else:
        y = torch.empty_like(x, dtype=torch.float32)
    y.copy_(x)
    return y.div_(255.0) if x.dtype == torch.uint8 else y


def _normalise_(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """In-place ``(x - mean) / std`` per channel; x: (B, 3, H, W) float32 in [0, 1]."""
    m = _const(tuple(mean), x.device, x.dtype).view(1, 3, 1, 1)
    s = _const(tuple(std), x.device, x.dtype).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


# --------------------------------------------------------------------------------------------------
# Geometric part: crop + resize + flip
# --------------------------------------------------------------------------------------------------


def _sample_coords(start: Tensor, length: Tensor, size: int, full: int) -> Tensor:
    """Normalised grid coordinates sampling ``[start, start + length)`` at ``size`` points.

    Follows ``F.interpolate(..., mode="bilinear", align_corners=False)`` applied to the cropped
    slice: output pixel k reads source position ``start + (k + 0.5) * length / size - 0.5``, clamped
    to the slice (interpolate replicates the slice's edge pixels; without the clamp grid_sample
    would blend in pixels from outside the crop box).

    Args:
        start: (B,) float first pixel of the box along this axis.
        length: (B,) float box length in pixels.
        size: Number of output samples.
        full: Input length along this axis (for normalisation).

    Returns:
        (B, size) coordinates in grid_sample's [-1, 1] convention (align_corners=False).
    """
    k = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5  # (S,)
    pos = start[:, None] + k[None, :] * (length / size)[:, None] - 0.5  # (B, S) input pixels
    pos = torch.maximum(pos, start[:, None])
    pos = torch.minimum(pos, (start + length - 1)[:, None])
    return (2.0 * pos + 1.0) / full - 1.0


def _crop_resize_flip(x: Tensor, crop: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop each image to its box, resize to ``size x size`` (bilinear) and mirror where ``flip``.

    Args:
        x: (B, 3, H, W) float32.
        crop: (B, 4) int64 ``(top, left, h, w)``.
        flip: (B,) bool.
        size: Output side S.

    Returns:
        (B, 3, S, S) float32.
    """
    B, _, H, W = x.shape
    if bool(((crop[:, 2] == size) & (crop[:, 3] == size)).all()):
        # No resizing for any image (disabled augmentation, or the centre-crop fallback): copy the
        # pixels exactly instead of interpolating, which keeps `identity_config` bit-exact with
        # `preprocess` (grid_sample's coordinate round trip is only exact to ~1e-6 of a pixel).
        if bool((crop == crop[0]).all()):
            top, left = int(crop[0, 0]), int(crop[0, 1])
            # clone, not contiguous(): x may be a scratch buffer that must not escape.
            out = x[:, :, top : top + size, left : left + size].clone(
                memory_format=torch.contiguous_format
            )  # (B, 3, S, S)
        else:
            ar = torch.arange(size, device=x.device)  # (S,)
            rows = (crop[:, 0:1] + ar)[:, :, None]  # (B, S, 1)
            cols = (crop[:, 1:2] + ar)[:, None, :]  # (B, 1, S)
            b = torch.arange(B, device=x.device)[:, None, None]
            # Advanced indices separated by a slice go first: (B, S, S, 3).
            out = x[b, :, rows, cols].permute(0, 3, 1, 2).contiguous()
        return _apply_subset(out, flip, lambda z: z.flip(-1))

    box = crop.to(torch.float32)
    gy = _sample_coords(box[:, 0], box[:, 2], size, H)  # (B, S)
    gx = _sample_coords(box[:, 1], box[:, 3], size, W)  # (B, S)
    # A horizontal flip of the output is the same grid read right-to-left: free.
    gx = torch.where(flip[:, None], gx.flip(1), gx)
    grid = _scratch("grid", (B, size, size, 2), gx)  # (B, S, S, 2) as (x, y)
    grid[..., 0].copy_(gx[:, None, :])
    grid[..., 1].copy_(gy[:, :, None])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------------


def rgb_to_grayscale(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Luma (ITU-R 601-2, as PIL/torchvision) of an RGB batch. x: (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.mul(r, _LUMA[0], out=out).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])


# Why the colour code below is written with in-place ops and `out=` buffers: on CPU every fresh
# multi-megabyte temporary costs page faults (glibc hands large blocks back to the OS when they are
# freed), and on this kind of machine that is 10-20x the cost of the arithmetic itself. Reusing a few
# buffers roughly doubles the throughput of the hue rotation. Bool masks, `torch.where`,
# `torch.remainder` and channel `argmax` are avoided for the same reason: their CPU kernels are
# 5-50x slower than plain float arithmetic.


def _is_max_(d: Tensor) -> Tensor:
    """In place, ``d = ch - v`` (<= 0) -> 1.0 where ``d == 0`` (ch is a largest channel) else 0.0.

    ``clamp(d * 1e30 + 1, 0, 1)``: any gap above ~1e-30 gives exactly 0; smaller gaps only occur
    between subnormal values, where the chroma that multiplies the hue is itself ~0.
    """
    return d.mul_(1e30).add_(1.0).clamp_(0.0, 1.0)


def _hue_chroma(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hue (in sixths of a turn, unwrapped: [-1, 5]), value and chroma of an RGB batch.

    The hexcone hue is ``(g - b) / c`` if red is the largest channel, else ``(b - r) / c + 2`` if
    green is, else ``(r - g) / c + 4`` (torchvision's precedence). The three cases are blended with
    float 0/1 masks; where two channels tie for the max both formulas give the same hue, and the
    precedence only matters for grey pixels (c == 0), which get hue 0.

    Args:
        x: (B, 3, H, W) float in [0, 1]. Not modified.

    Returns:
        ``(h6, v, c)``, each (B, 1, H, W): hue * 6 (wrap with :func:`_wrap6_`), max channel,
        max - min. They are scratch buffers (CPU): copy anything that must outlive the caller.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    shape = (x.shape[0], 1, *x.shape[2:])
    v = torch.amax(x, dim=1, keepdim=True, out=_scratch("hue_v", shape, x))  # (B, 1, H, W)
    c = torch.amin(x, dim=1, keepdim=True, out=_scratch("hue_c", shape, x))
    c.neg_().add_(v)  # chroma = max - min
    m_r = _is_max_(torch.sub(r, v, out=_scratch("hue_mr", shape, x)))
    m_g = _is_max_(torch.sub(g, v, out=_scratch("hue_mg", shape, x)))
    m_g.addcmul_(m_g, m_r, value=-1.0)  # green counts only where red is not the max
    # h6 * c = n_b + m_r * (n_r - n_b) + m_g * (n_g - n_b), with n_* the three numerators * c.
    n_b = torch.sub(r, g, out=_scratch("hue_nb", shape, x)).add_(c, alpha=4.0)
    h6 = torch.sub(g, b, out=_scratch("hue_h6", shape, x)).sub_(n_b).mul_(m_r)
    tmp = torch.sub(b, r, out=m_r).add_(c, alpha=2.0).sub_(n_b).mul_(m_g)  # reuses m_r's memory
    h6.add_(tmp).add_(n_b)
    # Grey pixels: c == 0 and m_r == 1, so the numerator is exactly 0 and any finite divisor gives
    # hue 0 (as torchvision); the clamp avoids 0/0 without a branch.
    h6.div_(torch.clamp(c, min=1e-12, out=n_b))
    return h6, v, c


def _wrap6_(h6: Tensor, scratch: Tensor | None = None) -> Tensor:
    """In place, wrap hue-in-sixths into [0, 6]: ``h - 6 * floor(h / 6)``.

    Written out because ``torch.remainder`` is several times slower on CPU. The result can be
    exactly 6.0 by rounding; every consumer treats 6 like 0.
    """
    q = torch.div(h6, 6.0, out=scratch) if scratch is not None else h6 / 6.0
    return h6.sub_(q.floor_(), alpha=6.0)


def _rgb_from_hue(h6: Tensor, v: Tensor, c: Tensor, out: Tensor | None = None) -> Tensor:
    """Inverse of :func:`_hue_chroma`: RGB from hue*6 in [0, 6], value and chroma.

    Channel n (centred at hue 0, 2, 4 sixths for R, G, B) is ``v - c * t`` where ``t`` is 0 within
    one sixth of the channel's centre, 1 beyond two sixths, and linear in between. With ``d`` the
    circular distance ``3 - |(|h6 - centre|) - 3|``, ``t = clamp(d, 1, 2) - 1``, which rearranges to
    ``(v - 2c) + c * clamp(|(|h6 - centre|) - 3|, 1, 2)``: no branches, no modulo.

    Args:
        h6: (B, 1, H, W) hue in sixths in [0, 6].
        v: (B, 1, H, W) value (max channel). Overwritten (used as scratch).
        c: (B, 1, H, W) chroma (max - min).
        out: Optional (B, 3, H, W) buffer for the result.

    Returns:
        (B, 3, H, W) RGB.
    """
    centre = _const((0.0, 2.0, 4.0), h6.device, h6.dtype).view(1, 3, 1, 1)
    a = torch.sub(h6, centre, out=out) if out is not None else h6 - centre  # (B, 3, H, W)
    a.abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    return a.mul_(c).add_(v.sub_(c, alpha=2.0))


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB -> HSV for a batch. x: (B, 3, H, W) in [0, 1] -> (B, 3, H, W), all channels in [0, 1].

    Hue is in turns in [0, 1) (0 for grey pixels), saturation is chroma / value (0 for black).
    """
    h6, v, c = _hue_chroma(x)
    h = _wrap6_(h6).div_(6.0)
    h = h.masked_fill_(h >= 1.0, 0.0)  # rounding can give exactly 1 turn
    s = c / v.clamp_min(1e-12)  # black: c == 0 -> s == 0
    return torch.cat((h, s, v), dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """HSV -> RGB for a batch; inverse of :func:`rgb_to_hsv`. x: (B, 3, H, W) -> (B, 3, H, W)."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _rgb_from_hue(_wrap6_(h * 6.0), v.clone(), s * v)


def _adjust_hue(x: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """Hue rotation; see :func:`adjust_hue`. ``out`` may be ``x`` itself (in-place use)."""
    h6, v, c = _hue_chroma(x)  # x is fully read here, so `out` (even if it is x) is free below
    h6.add_((shift.to(x.dtype) * 6.0).view(-1, 1, 1, 1))
    scratch = out[:, 0:1] if out is not None else None
    return _rgb_from_hue(_wrap6_(h6, scratch=scratch), v, c, out=out)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each image by its own shift, keeping HSV saturation and value.

    Equivalent to ``hsv_to_rgb`` of ``rgb_to_hsv(x)`` with ``h = (h + shift) mod 1`` (as
    torchvision's ``adjust_hue``), but works with value and chroma directly, which skips the
    saturation division and multiplication.

    Args:
        x: (B, 3, H, W) float in [0, 1]. Not modified.
        shift: (B,) hue shift in turns.

    Returns:
        (B, 3, H, W) float in [0, 1], a new tensor.
    """
    return _adjust_hue(x, shift)


def _colour_jitter_(x: Tensor, factors: Tensor, mask: Tensor, cfg: AugmentConfig) -> Tensor:
    """Brightness, contrast, saturation, hue (this fixed order) on the images where ``mask``.

    Images outside the mask get neutral factors (1, 1, 1, 0) instead of being split off: the three
    multiplicative ops are then exact no-ops and the hue rotation by 0 changes them by at most a
    float rounding (~1e-7), which is cheaper than gathering/scattering the selected subset.

    Args:
        x: (B, 3, H, W) float32 in [0, 1]; modified in place where possible.
        factors: (B, 4) as produced by :func:`sample_params`.
        mask: (B,) bool.
        cfg: Config (ops whose strength is 0 are skipped).

    Returns:
        The jittered batch (x itself or a new tensor).
    """
    neutral = _const((1.0, 1.0, 1.0, 0.0), x.device, x.dtype)
    f = torch.where(mask[:, None], factors.to(x.dtype), neutral)  # (B, 4)
    fb, fc, fs = (f[:, k].view(-1, 1, 1, 1) for k in range(3))  # each (B, 1, 1, 1)
    if cfg.brightness > 0:
        x.mul_(fb).clamp_(0.0, 1.0)
    if cfg.contrast > 0:
        # Blend with the mean grey level of the whole image (torchvision adjust_contrast). The mean
        # of the luma is the luma of the channel means, so no per-pixel grey image is needed.
        luma = _const(_LUMA, x.device, x.dtype)
        grey_mean = (x.mean(dim=(2, 3)) @ luma).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x.mul_(fc).add_(grey_mean * (1.0 - fc)).clamp_(0.0, 1.0)
    if cfg.saturation > 0:
        grey = rgb_to_grayscale(x, out=_scratch("grey", (x.shape[0], 1, *x.shape[2:]), x))
        x.mul_(fs).add_(grey.mul_(1.0 - fs)).clamp_(0.0, 1.0)
    if cfg.hue > 0:
        x = _adjust_hue(x, f[:, 3], out=x)  # x is fully read before out is written
    return x


def _apply_subset(y: Tensor, mask: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Replace ``y[mask]`` by ``fn(y[mask])``; images outside the mask stay bit-identical.

    Working on the selected subset costs ``p`` of the full op plus a gather and a scatter of that
    subset, and avoids ``torch.where`` (slow on CPU) and wasted work on unselected images.

    Args:
        y: (B, C, H, W).
        mask: (B,) bool.
        fn: Batch -> batch of the same shape.

    Returns:
        y (modified in place) or ``fn(y)`` when every image is selected.
    """
    idx = mask.nonzero().squeeze(1)  # (K,)
    k = idx.numel()
    if k == 0:
        return y
    if k == y.shape[0]:
        return fn(y)
    y[idx] = fn(y.index_select(0, idx))
    return y


# --------------------------------------------------------------------------------------------------
# Blur
# --------------------------------------------------------------------------------------------------


def _gaussian_kernels(sigma: Tensor, ksize: int, dtype: torch.dtype) -> Tensor:
    """Normalised 1-D Gaussian kernels, one per sigma. sigma: (B,) -> (B, ksize)."""
    t = torch.arange(ksize, device=sigma.device, dtype=dtype) - ksize // 2  # (K,)
    kern = torch.exp(-(t[None, :] ** 2) / (2.0 * sigma[:, None].to(dtype) ** 2))  # (B, K)
    return kern / kern.sum(dim=1, keepdim=True)


def _blur_1d(x: Tensor, kern: Tensor, dim: int) -> Tensor:
    """Convolve along ``dim`` (2 = rows, 3 = columns) with per-image kernels, reflect padding.

    A weighted sum of ``K`` shifted views (one ``addcmul`` each) rather than a grouped
    convolution: with a different kernel per image, depthwise ``conv2d`` on CPU is ~1.6-1.8x slower
    (measured for K = 3 at 32 px and K = 23 at 224 px), and the result is identical.

    Args:
        x: (B, C, H, W).
        kern: (B, K) kernels, K odd.
        dim: 2 or 3.

    Returns:
        (B, C, H, W).
    """
    K = kern.shape[1]
    half = K // 2
    n = x.shape[dim]
    # Reflect padding needs pad < length; for tiny images fall back to replicate.
    mode = "reflect" if half < n else "replicate"
    pad = (half, half, 0, 0) if dim == 3 else (0, 0, half, half)
    xp = F.pad(x, pad, mode=mode)
    w = kern.to(x.dtype).view(-1, K, 1, 1)  # (B, K, 1, 1): w[:, k:k+1] broadcasts over (C, H, W)
    out = xp.narrow(dim, 0, n) * w[:, 0:1]
    for k in range(1, K):
        out.addcmul_(xp.narrow(dim, k, n), w[:, k : k + 1])
    return out


def _gaussian_blur(x: Tensor, sigma: Tensor, ksize: int) -> Tensor:
    """Separable Gaussian blur with one sigma per image, reflect padding (as torchvision).

    Args:
        x: (B, 3, H, W) float32.
        sigma: (B,) standard deviations in pixels.
        ksize: Odd kernel side.

    Returns:
        (B, 3, H, W) blurred (a new tensor).
    """
    kern = _gaussian_kernels(sigma, ksize, x.dtype)  # (B, K)
    return _blur_1d(_blur_1d(x, kern, 3), kern, 2)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def _check_images(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")


@torch.no_grad()
def apply_params(x: Tensor, params: dict[str, Tensor], cfg: AugmentConfig) -> Tensor:
    """Apply pre-drawn per-image parameters to a batch.

    Order: crop + resize + flip -> colour jitter (brightness, contrast, saturation, hue) ->
    grayscale -> blur -> solarise -> normalise. Operations whose probability (or strength) is 0 in
    ``cfg`` are skipped entirely, so a disabled augmentation costs nothing and changes nothing.

    Args:
        x: (B, 3, H, W) uint8 in [0, 255] (or float in [0, 1]) on any device.
        params: Output of :func:`sample_params` for this batch (on x's device).
        cfg: The config the parameters were drawn with.

    Returns:
        (B, 3, size, size) float32, normalised with ``cfg.mean`` / ``cfg.std``, on x's device.
    """
    _check_images(x)
    y = _to_unit_float(x, scratch=True)  # (B, 3, H, W), a reusable buffer
    y = _crop_resize_flip(y, params["crop"], params["flip"], cfg.size)  # (B, 3, S, S)

    if cfg.jitter_p > 0 and (cfg.brightness > 0 or cfg.contrast > 0 or cfg.saturation > 0 or cfg.hue > 0):
        y = _colour_jitter_(y, params["jitter"], params["jitter_mask"], cfg)
    if cfg.grayscale_p > 0:
        y = _apply_subset(y, params["gray_mask"], lambda z: rgb_to_grayscale(z).repeat(1, 3, 1, 1))
    if cfg.blur_p > 0:
        ksize = blur_kernel_size(cfg.size)
        sigma = params["blur_sigma"]
        mask = params["blur_mask"]
        y = _apply_subset(y, mask, lambda z: _gaussian_blur(z, sigma[mask], ksize))
    if cfg.solarize_p > 0:
        y = _apply_subset(y, params["solarize_mask"], lambda z: torch.where(z >= 0.5, 1.0 - z, z))
    return _normalise_(y, cfg.mean, cfg.std)


@torch.no_grad()
def augment(
    x: Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None, *, cropped: bool = False
) -> Tensor:
    """Randomly augment a batch, each image with its own parameters.

    Args:
        x: (B, 3, H, W) uint8 (or float in [0, 1]) on any device.
        cfg: Augmentation config.
        generator: The only source of randomness: a CPU generator (recommended: the parameters are
            then identical on every device) or one on ``x.device``. ``None`` uses torch's global
            CPU RNG.
        cropped: ``x`` holds crops already drawn and resized to ``cfg.size`` (large images, where
            the DataLoader workers crop each image at decode time, `instdisc.loader`): the crop is
            the whole input and the rest of the recipe (flip, jitter, grayscale, blur, ...) runs
            as usual. The generator advances exactly as it does without ``cropped``.

    Returns:
        (B, 3, cfg.size, cfg.size) float32 normalised views, on x's device.
    """
    _check_images(x)
    B, _, H, W = x.shape
    if cropped and (H, W) != (cfg.size, cfg.size):
        raise ValueError(f"cropped=True needs {cfg.size}x{cfg.size} inputs, got {H}x{W}")
    params = sample_params(B, H, W, cfg, generator, x.device)
    if cropped:
        full = torch.tensor([0, 0, H, W], dtype=torch.int64, device=params["crop"].device)
        params["crop"] = full.expand(B, 4)  # (B, 4): the whole (already cropped) image
    return apply_params(x, params, cfg)


@torch.no_grad()
def preprocess(
    x: Tensor,
    size: int | None = None,
    mean: tuple[float, float, float] = CIFAR_MEAN,
    std: tuple[float, float, float] = CIFAR_STD,
) -> Tensor:
    """Deterministic evaluation transform.

    If ``size`` is None or the input is already ``size x size``, only converts and normalises.
    Otherwise resizes so the shorter side is ``size`` (bilinear, antialiased, like torchvision's
    ``Resize``; the longer side is truncated like torchvision does) and takes the centre
    ``size x size`` crop (offset ``(H - size) // 2``, which may differ by one pixel from
    torchvision's rounding on odd margins).

    Args:
        x: (B, 3, H, W) uint8 (or float in [0, 1]).
        size: Output side, or None to keep the input size.
        mean: Normalisation mean.
        std: Normalisation std.

    Returns:
        (B, 3, size, size) (or (B, 3, H, W) when size is None) float32, normalised.
    """
    _check_images(x)
    y = _to_unit_float(x)  # (B, 3, H, W)
    if size is not None:
        H, W = y.shape[-2:]
        if min(H, W) != size:
            if H <= W:
                nh, nw = size, int(size * W / H)
            else:
                nh, nw = int(size * H / W), size
            y = F.interpolate(y, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
            H, W = nh, nw
        if H != size or W != size:
            top, left = (H - size) // 2, (W - size) // 2
            y = y[:, :, top : top + size, left : left + size].contiguous()
    return _normalise_(y, mean, std)

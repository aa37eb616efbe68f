"""Built-in procedural sources: scikit-learn's digits upsampled to 32x32, and the synthetic
shapes source (deterministic per split). Their splits and classes are described in the
`instdisc.sources` docstring.
"""

from __future__ import annotations

import numpy as np

from instdisc.errors import DataError

SYNTHETIC_VERSION = "synthetic-v1"
DIGITS_VERSION = "digits-v1-bilinear32"
SYNTHETIC_DEFAULT_N = 512
SYNTHETIC_MAX_N = 1_000_000  # the images are generated in memory: 3 KiB each
_BUILTINS = ("digits", "synthetic", "cifar10", "cifar100")


# --------------------------------------------------------------------------------------------
# Built-in procedural sources
# --------------------------------------------------------------------------------------------


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resampling with half-pixel centres, edges clamped."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - w)
    np.add.at(m, (np.arange(n_out), hi), w)
    return m


def _make_digits(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """sklearn digits -> (N, 32, 32, 3) uint8 (see the `instdisc.sources` docstring for the split)."""
    from sklearn.datasets import load_digits  # slow import: only when the cache is cold

    d = load_digits()
    idx = np.arange(len(d.images))
    sel = idx % 5 == 0 if split == "test" else idx % 5 != 0
    m = _bilinear_matrix(32, 8)
    up = np.einsum("ij,njk,lk->nil", m, d.images[sel] * (255.0 / 16.0), m)
    grey = np.clip(np.rint(up), 0, 255).astype(np.uint8)
    return (
        np.repeat(grey[..., None], 3, axis=-1),
        d.target[sel].astype(np.int64),
        [str(c) for c in range(10)],
    )


SYNTHETIC_CLASSES = (
    "disk",
    "square",
    "triangle",
    "ring",
    "hbar",
    "vbar",
    "plus",
    "x",
    "stripes",
    "checker",
)
"""Class names of the synthetic source; class k also has its own hue band (k/10 +- 0.03)."""


def _synthetic_masks(k: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    box = np.maximum(au, av)
    r2 = u * u + v * v
    if k == 0:
        return r2 < 1.0
    if k == 1:
        return box < 0.8
    if k == 2:
        return (v < 0.75) & (v > -0.85 + 2.2 * au)
    if k == 3:
        return (r2 < 1.0) & (r2 > 0.36)
    if k == 4:
        return (av < 0.32) & (au < 1.05)
    if k == 5:
        return (au < 0.32) & (av < 1.05)
    if k == 6:
        return ((au < 0.25) & (av < 1.0)) | ((av < 0.25) & (au < 1.0))
    if k == 7:
        return ((np.abs(u - v) < 0.33) | (np.abs(u + v) < 0.33)) & (box < 0.8)
    if k == 8:
        return (box < 0.85) & (np.floor((v + 0.85) * 2.35) % 2 == 0)
    return (box < 0.85) & ((np.floor((u + 0.85) * 2.35) + np.floor((v + 0.85) * 2.35)) % 2 == 0)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [
            np.stack([v, t, p], -1),
            np.stack([q, v, p], -1),
            np.stack([p, v, t], -1),
            np.stack([p, q, v], -1),
            np.stack([t, p, v], -1),
            np.stack([v, p, q], -1),
        ]
    )
    return table[i, np.arange(len(h))]


def _make_synthetic(n: int, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` procedural 32x32 images with balanced labels, deterministic per split."""
    rng = np.random.default_rng([0x1D15C, 0 if split == "train" else 1])
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    cy, cx = rng.uniform(11, 21, n), rng.uniform(11, 21, n)
    radius = rng.uniform(6.5, 10.5, n)
    theta = rng.uniform(-0.25, 0.25, n)  # small: horizontal and vertical bars must stay distinct
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) + 0.5
    dx = xx[None] - cx[:, None, None].astype(np.float32)
    dy = yy[None] - cy[:, None, None].astype(np.float32)
    c = np.cos(theta)[:, None, None].astype(np.float32)
    s = np.sin(theta)[:, None, None].astype(np.float32)
    r = radius[:, None, None].astype(np.float32)
    u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / r
    mask = np.zeros((n, 32, 32), dtype=bool)
    for k in range(10):
        sel = labels == k
        mask[sel] = _synthetic_masks(k, u[sel], v[sel])
    hue = (labels / 10.0 + rng.uniform(-0.03, 0.03, n)) % 1.0
    fg = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0, n), rng.uniform(0.75, 1.0, n)) * 255
    bg = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.5, n), rng.uniform(0.05, 0.45, n)) * 255
    grad = rng.uniform(-0.6, 0.6, (n, 2)).astype(np.float32)
    shade = 1 + (grad[:, 0, None, None] * (xx - 16) + grad[:, 1, None, None] * (yy - 16)) / 32
    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :] * shade[..., None])
    img = img + rng.normal(0, 10, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, list(SYNTHETIC_CLASSES)


def _parse_builtin(spec: str) -> tuple[str, int | None] | None:
    low = spec.strip().lower()
    if low in ("digits", "cifar10", "cifar100"):
        return low, None
    if low == "synthetic":
        return "synthetic", SYNTHETIC_DEFAULT_N
    if low.startswith("synthetic:"):
        try:
            n = int(low.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise DataError(
                f"{spec!r}: synthetic:N needs a positive whole number N, e.g. synthetic:512."
            )
        if n > SYNTHETIC_MAX_N:
            raise DataError(
                f"{spec!r}: synthetic:N is limited to N <= {SYNTHETIC_MAX_N:,} images ({SYNTHETIC_MAX_N * 3072 / 2**30:.1f} GiB "
                f"of 32x32 RGB, built in memory); {n:,} would need {n * 3072 / 2**30:,.0f} GiB. Use a smaller N, or a "
                "folder or archive for a large data set."
            )
        return "synthetic", n
    return None

"""The array cache: small-image sources decoded once into ``CACHE/arrays/<key>.npy`` (uint8,
N x H x W x 3) plus ``<key>.labels.npy`` and ``<key>.json`` (written last: it marks a complete
entry), each written atomically, and reopened as a copy-on-write memmap. A key hashes the
source's content and the parameters (see "Storage" in the `instdisc.sources` docstring).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from instdisc.errors import DataError
from instdisc.sources.images import ArrayImageSet, fit_image

CACHE_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$INSTDISC_CACHE`` if set, else ``~/.cache/instdisc``."""
    env = os.environ.get("INSTDISC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "instdisc"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:48] or "source"


def _cache_key(slug: str, split: str, params: dict[str, Any]) -> str:
    payload = json.dumps({"format": CACHE_FORMAT_VERSION, "split": split, **params}, sort_keys=True)
    return f"{_slug(slug)}-{split}-{hashlib.sha256(payload.encode()).hexdigest()[:24]}"


# --------------------------------------------------------------------------------------------
# The array cache
# --------------------------------------------------------------------------------------------


def _arrays_dir(cache_dir: Path) -> Path:
    return cache_dir / "arrays"


def _load_cached(cache_dir: Path, key: str, name: str, split: str) -> ArrayImageSet | None:
    """The cached set under ``key``, or None if absent or unusable (then it is rebuilt)."""
    d = _arrays_dir(cache_dir)
    meta_path = d / f"{key}.json"
    if not meta_path.is_file():
        return None
    try:
        info = json.loads(meta_path.read_text(encoding="utf-8"))
        # copy-on-write mapping: pages are shared between processes and the cache file can never
        # be modified through it, yet the array is writable (torch.from_numpy warns on read-only)
        images = np.load(d / f"{key}.npy", mmap_mode="c", allow_pickle=False)
        labels = np.load(d / f"{key}.labels.npy", allow_pickle=False) if info["labelled"] else None
        if images.shape != tuple(info["shape"]) or images.dtype != np.uint8:
            return None
        out = ArrayImageSet(
            images,
            labels,
            info["classes"],
            name=name,
            split=split,
            meta={**info["meta"], "source": name, "cache_key": key, "cached": True},
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    out._cache_file = str(d / f"{key}.npy")
    return out


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`checkpoint.atomic_write` through an open binary file (readers never see a part)."""
    from instdisc.checkpoint import atomic_write

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_file)


def _save_arrays(
    cache_dir: Path,
    key: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    classes: list[str],
    *,
    name: str,
    split: str,
    meta: dict[str, Any],
) -> ArrayImageSet:
    """Write the cache entry (images, labels, then the JSON that marks it complete) and return it
    memory-mapped. If the cache is not writable the set is returned in memory with a warning."""
    d = _arrays_dir(cache_dir)
    info = {
        "format": CACHE_FORMAT_VERSION,
        "name": name,
        "split": split,
        "classes": classes,
        "shape": list(images.shape),
        "labelled": labels is not None,
        "meta": meta,
    }
    try:
        d.mkdir(parents=True, exist_ok=True)
        _write_atomic(d / f"{key}.npy", lambda f: np.save(f, images, allow_pickle=False))
        if labels is not None:
            _write_atomic(d / f"{key}.labels.npy", lambda f: np.save(f, labels, allow_pickle=False))
        _write_atomic(d / f"{key}.json", lambda f: f.write(json.dumps(info, indent=1).encode()))
    except OSError as e:
        warnings.warn(
            f"instdisc: cannot write the image cache in {d} ({e}); keeping {name} in memory.",
            stacklevel=3,
        )
        return ArrayImageSet(
            images, labels, classes, name=name, split=split, meta={**meta, "cache_key": key}
        )
    out = _load_cached(cache_dir, key, name, split)
    if out is None:  # pragma: no cover - only if the file vanished between write and read
        raise DataError(f"the cache entry {d / key}.npy disappeared right after it was written.")
    out.meta["cached"] = False
    return out


def _resize_all(images: np.ndarray, image_size: int | None) -> np.ndarray:
    if not image_size or images.shape[1:3] == (image_size, image_size):
        return images
    out = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for i, a in enumerate(images):
        out[i] = np.asarray(fit_image(Image.fromarray(a), (image_size, image_size)))
    return out


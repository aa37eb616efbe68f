"""Dataset sources: the whole data-reading layer.

`open_source(spec, split)` turns a source specification into an `ImageSet`, whose row ``i`` is
dataset index ``i`` -- the instance label of NPID, PIC and SeLa. Everything here is therefore built
around one rule: **the order of a source is deterministic and never depends on what decodes**.
Class folders and file names are sorted; a file that cannot be decoded is never skipped (that
would shift the index of every later image); opening such a source raises `DataError` listing the
bad files and pointing at ``instdisc data check PATH``.

Source specifications
---------------------
``digits``
    scikit-learn's bundled 1,797 handwritten digits (8x8, grey levels 0..16). Grey levels are
    scaled to 0..255 and the images are upsampled to 32x32 with **bilinear** interpolation
    (half-pixel centres, edges clamped; smoother than nearest, so random crops look like digits),
    then repeated to 3 channels. Split: ``test`` = indices ``i % 5 == 0`` of the sklearn order
    (360 images), ``train`` = the rest (1,437). Classes ``"0"`` .. ``"9"``.
``synthetic`` / ``synthetic:N``
    Procedural 32x32 RGB images of 10 classes (a class = a shape *and* a hue band; position, size,
    small rotation, colour jitter, background and pixel noise vary per image). ``N`` (default 512)
    train images, ``max(1, N // 4)`` test images; each split has its own fixed seed, so the images
    are identical on every machine and run. Generated in a few milliseconds.
``cifar10`` / ``cifar100``
    The official python-pickle batches in ``CACHE/cifar10/cifar-10-batches-py/`` (resp.
    ``CACHE/cifar100/cifar-100-python/``); ``download=True`` fetches the official tarball when they
    are absent (md5 verified before anything is extracted). CIFAR-100 uses the 100 fine labels.
    These names always mean the built-in datasets: to read a local folder called ``cifar10``
    write ``./cifar10``.
a directory
    * CIFAR python batches (the batch folder itself or its parent) -- detected from the contents;
    * PIC's zipped layout: ``train.zip`` + ``train_map.txt`` (and ``val.zip`` + ``val_map.txt``
      for ``test``); lines are ``relative/path<TAB>label``; the map's line order is the index
      order; images are read from the zip without extracting;
    * an ImageFolder: ``train/<class>/<files>`` and ``test/<class>/<files>`` (``test`` falls back
      to ``val/``), or, without split folders, ``<class>/<files>`` as the train split only. A
      folder holding only images (no class folders) is an unlabelled source (``labels is None``).
      Hidden files/folders (``.*``, ``__MACOSX``) and files without an image extension are ignored.
an archive (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``, ``.zip``)
    The same ImageFolder tree (optionally under one top-level folder), or CIFAR python batches
    (e.g. the official ``cifar-10-python.tar.gz`` itself), read from the archive members without
    extracting anything to disk.

Storage
-------
*Small images* (``in_memory=True``, or, by default, when 16 images spread over the split -- the
first 16 of a compressed tar -- are all <= 64 px on their longest side, judged from their headers
alone so that the decision is cheap even for ImageNet) are decoded once into ``CACHE/arrays/<key>.npy`` (uint8, N x H x W x 3) plus ``<key>.labels.npy`` and
``<key>.json`` (classes, meta; written last, so its presence marks a complete entry), all written
atomically (temporary file + ``os.replace``). They come back as an `ArrayImageSet` whose
``images`` is a copy-on-write ``np.memmap`` of that file, so the second open costs milliseconds.
Opening one split of an archive also decodes the other one while the archive is listed (listing
is the slow part; the other split is nearly always opened next). The key hashes the
source's content: the sha256 of an archive's bytes (above 256 MiB: its size, mtime and the sha256 of
its first and last 8 MiB, so opening a 150 GB archive does not hash 150 GB), the relative paths,
sizes and mtimes of a directory's files, or a version string and the parameters of a built-in.
Different image sizes in this path are made uniform: to ``image_size`` when given, else to the
most common size of the source (ties: the larger), by the resize + centre crop of `fit_image`.
An unreadable cache entry is rebuilt; an unwritable cache directory gives a warning and an
in-memory set.

*Large images* become a `FileImageSet`: every file is listed up front (so indices are fixed) and
empty, missing or link members are rejected at open, but images are only decoded by ``read(i)``
(typically in DataLoader workers); ``instdisc data check`` decodes everything ahead of time.
``read(i)`` resizes the short side to ``image_size`` (default 256: room for the usual 224-px
random crops) with bilinear filtering and centre-crops a square. Large images inside a
*compressed* tar cannot be read at random; that case raises `DataError` suggesting to decompress
(``gunzip``) or extract the archive.

``image_size`` given => every image of every source (built-ins included) is stored/returned as
``image_size x image_size`` (short side resized, centre crop).

Pixels
------
Every image is returned as RGB uint8: grey ("L", "1") is replicated, palette ("P") images are
expanded (through RGBA when they have transparency), alpha ("RGBA", "LA", ...) is *dropped*
(the colour channels are kept, as torchvision's loader does, so results stay comparable with the
reference implementations), CMYK/YCbCr go through Pillow's conversion, and 16-bit / 32-bit integer
grey ("I;16", "I") is scaled from 0..65535 to 0..255; float grey ("F") is read as 0..1 when its
maximum is <= 1, else as 0..255. EXIF orientation is *not* applied (again like torchvision). For
animated GIF/TIFF the first frame is used.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib
import io
import json
import lzma
import operator
import os
import pickle
import posixpath
import re
import shutil
import sys
import tarfile
import threading
import urllib.error
import urllib.request
import uuid
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from instdisc.errors import DataError
from instdisc.progress import Progress

__all__ = [
    "ArrayImageSet",
    "BadImageError",
    "CIFAR_DOWNLOADS",
    "CifarDownload",
    "FileImageSet",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "decode_image",
    "default_cache_dir",
    "download_cifar",
    "fit_image",
    "open_source",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff",
)
"""File extensions (compared case-insensitively) that count as images in folders and archives."""

SMALL_IMAGE_MAX_SIDE = 64
"""Sources whose probed images are all at most this long on their longest side go to the array cache."""

DEFAULT_FILE_IMAGE_SIZE = 256
"""Side of the images `FileImageSet.read` returns when no ``image_size`` is given."""

SPLITS = ("train", "test")
CACHE_FORMAT_VERSION = 1
SYNTHETIC_VERSION = "synthetic-v1"
DIGITS_VERSION = "digits-v1-bilinear32"
SYNTHETIC_DEFAULT_N = 512

_PROBE_COUNT = 16  # images whose header decides "small" vs "large"
_PROGRESS_MIN_ITEMS = 2000  # smaller jobs finish before a progress line would help
_FULL_HASH_LIMIT = 256 * 2**20  # files up to this size are fingerprinted by their full sha256
_EDGE_HASH_BYTES = 8 * 2**20
_TAR_BUFFER_LIMIT = 512 * 2**20  # member bytes kept while listing a compressed tar
_MAX_LISTED = 20  # bad files named in an error message
_SPLIT_DIRS = ("train", "test", "val")
_BUILTINS = ("digits", "synthetic", "cifar10", "cifar100")


# --------------------------------------------------------------------------------------------
# Image sets
# --------------------------------------------------------------------------------------------


class ImageSet:
    """An ordered, indexable set of RGB images; row ``i`` is dataset index ``i``.

    Attributes:
        name: what was opened, e.g. ``"cifar10"``, ``"digits"`` or the resolved path.
        split: ``"train"`` or ``"test"``.
        labels: ``(N,)`` int64 class labels, or ``None`` for an unlabelled source.
        classes: class names in label order (``[]`` when unlabelled).
        meta: free-form facts about the source (format, cache key, ...), for logs and checkpoints.
    """

    name: str
    split: str
    labels: np.ndarray | None
    classes: list[str]
    meta: dict[str, Any]

    def __init__(
        self,
        *,
        name: str,
        split: str,
        labels: np.ndarray | None,
        classes: Sequence[str] | None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.split = split
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and self.labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {self.labels.shape}")
        if classes is None:
            n_cls = 0 if self.labels is None or not len(self.labels) else int(self.labels.max()) + 1
            classes = [str(c) for c in range(n_cls)]
        self.classes = list(classes)
        self.meta = dict(meta or {})

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabelled source)."""
        return len(self.classes)

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> np.ndarray:
        """Image of dataset index ``i`` as an ``(H, W, 3)`` uint8 RGB array."""
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        return i % n if n else i

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, classes={len(self.classes)})"


class ArrayImageSet(ImageSet):
    """Images that are all the same size, held in one ``(N, H, W, 3)`` uint8 array.

    Usually ``images`` is a copy-on-write ``np.memmap`` of the cache file: its pages are shared by
    every process that opens it, and writing to it changes only the writer's private copy. Pickling (e.g. to spawned DataLoader workers) sends the cache path, not the
    pixels.

    Args:
        images: ``(N, H, W, 3)`` uint8 array.
        labels: ``(N,)`` integer labels or ``None``.
        classes: class names; default ``"0" .. str(max label)``.
        name: source name.
        split: ``"train"`` or ``"test"``.
        meta: free-form facts about the source.
    """

    images: np.ndarray

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        classes: Sequence[str] | None = None,
        *,
        name: str = "array",
        split: str = "train",
        meta: dict[str, Any] | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        super().__init__(name=name, split=split, labels=labels, classes=classes, meta=meta)
        if self.labels is not None and len(self.labels) != len(images):
            raise ValueError(f"{len(self.labels)} labels for {len(images)} images")
        self.images = images
        self._cache_file: str | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, i: int) -> np.ndarray:
        """A writable copy of image ``i`` (a view of a memmap would be read-only)."""
        return np.array(self.images[self._check_index(i)])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._cache_file is not None:
            state["images"] = None  # re-mapped from the cache file on the other side
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.images is None:
            self.images = np.load(self._cache_file, mmap_mode="c", allow_pickle=False)


class FileImageSet(ImageSet):
    """Images decoded on demand from files, archive members or zip members (ImageNet scale).

    Every member is listed when the set is opened, so indices are fixed; ``read(i)`` decodes,
    resizes the short side to ``image_size`` and centre-crops a square, so a DataLoader can stack
    the results. Safe to use from forked or spawned workers (file handles are opened per process).

    Args:
        items: the byte source of each index (internal).
        labels: ``(N,)`` labels or ``None``.
        classes: class names in label order.
        name: source name.
        split: ``"train"`` or ``"test"``.
        image_size: side of the returned images (default `DEFAULT_FILE_IMAGE_SIZE`).
        meta: free-form facts about the source.
    """

    def __init__(
        self,
        items: _Items,
        labels: np.ndarray | None,
        classes: Sequence[str] | None,
        *,
        name: str,
        split: str,
        image_size: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(name=name, split=split, labels=labels, classes=classes, meta=meta)
        if self.labels is not None and len(self.labels) != len(items):
            raise ValueError(f"{len(self.labels)} labels for {len(items)} images")
        self.items = items
        self.image_size = int(image_size or DEFAULT_FILE_IMAGE_SIZE)

    def __len__(self) -> int:
        return len(self.items)

    def path(self, i: int) -> str:
        """Where image ``i`` comes from (a file path, or ``archive:member``)."""
        return self.items.display(self._check_index(i))

    def read(self, i: int) -> np.ndarray:
        """Decode image ``i`` -> ``(image_size, image_size, 3)`` uint8 RGB.

        Raises:
            DataError: the file became unreadable after the source was opened.
        """
        i = self._check_index(i)
        s = self.image_size
        try:
            data = self.items.read(i)
            img, _ = decode_image(data, draft=(s, s))
        except (OSError, BadImageError) as e:
            reason = e.reason if isinstance(e, BadImageError) else f"unreadable ({e})"
            raise DataError(
                f"image {i} of {self.name} ({self.items.display(i)}) cannot be decoded: {reason}. "
                f"Run `instdisc data check {self.name}` to list every bad file, then fix or delete "
                "them (the source's file list is fixed when it is opened, so changes need a restart)."
            ) from None
        return np.array(fit_image(img, (s, s)))  # a fresh, writable array (asarray is read-only)


# --------------------------------------------------------------------------------------------
# Decoding (shared with datacheck so both agree on what "bad" means)
# --------------------------------------------------------------------------------------------


class BadImageError(Exception):
    """Bytes that do not decode to an image.

    Attributes:
        reason: short, stable category: ``"empty"``, ``"unreadable"``, ``"truncated"``,
            ``"corrupt"``, ``"too large"`` or ``"unsupported mode"``; may carry details after it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_truncation(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, EOFError) or "truncated" in msg or "end of file" in msg or "premature" in msg


def decode_image(data: bytes, *, draft: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """Decode image bytes completely and convert them to RGB.

    ``Image.open`` only parses the header; the full ``load()`` is what catches truncated and
    corrupt files, so it is always done here (never lazily later).

    Args:
        data: the encoded file.
        draft: for JPEG, let libjpeg decode at a reduced scale that still covers this
            ``(width, height)`` (much faster for big photos that are shrunk anyway).

    Returns:
        ``(rgb_image, original_mode)``.

    Raises:
        BadImageError: empty, unidentifiable, truncated, corrupt or oversized data.
    """
    if not data:
        raise BadImageError("empty")
    # Pillow warns about oddities it works around (corrupt EXIF, odd TIFF tags); the verdict here
    # is "decodes or not", and thousands of such lines would drown the progress output.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _decode_image(data, draft)


def _decode_image(data: bytes, draft: tuple[int, int] | None) -> tuple[Image.Image, str]:
    try:
        img = Image.open(io.BytesIO(data))
        mode = img.mode
    except Image.DecompressionBombError:
        raise BadImageError("too large") from None
    except Exception as e:  # Pillow plugins raise many exception types on garbage
        if _is_truncation(e):  # the header itself is cut short ("Truncated File Read")
            raise BadImageError("truncated") from None
        raise BadImageError(f"unreadable ({type(e).__name__})") from None
    try:
        if draft is not None and img.format == "JPEG" and img.width and img.height:
            scale = max(draft[0] / img.width, draft[1] / img.height)
            img.draft(img.mode, (int(img.width * scale) + 1, int(img.height * scale) + 1))
        img.load()
    except Image.DecompressionBombError:
        raise BadImageError("too large") from None
    except MemoryError:
        raise BadImageError("too large") from None
    except Exception as e:
        raise BadImageError("truncated" if _is_truncation(e) else f"corrupt ({type(e).__name__})") from None
    if img.width == 0 or img.height == 0:
        raise BadImageError("empty")
    try:
        rgb = _to_rgb(img)
    except Exception:
        raise BadImageError(f"unsupported mode ({mode})") from None
    return rgb, mode


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I"):  # "I;16", "I;16B", "I" ...: integer grey, assumed 16-bit range
        a = np.asarray(img).astype(np.int64)
        grey = ((np.clip(a, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img.convert("RGB")


def fit_image(img: Image.Image, size_hw: tuple[int, int]) -> Image.Image:
    """Resize so the image covers ``(height, width)`` (bilinear), then centre-crop to it.

    For a square target this is the usual "short side to S, centre crop S x S".
    """
    th, tw = size_hw
    w, h = img.size
    if (w, h) == (tw, th):
        return img
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def _probe_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header only, or None when unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$INSTDISC_CACHE`` if set, else ``~/.cache/instdisc``."""
    env = os.environ.get("INSTDISC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "instdisc"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(name: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in name.split("/"))


def _norm_member(name: str) -> str:
    """Normalise an archive member name to a relative POSIX path ('' for the root)."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    name = posixpath.normpath(name.lstrip("/"))
    return "" if name == "." else name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:48] or "source"


def _file_digest(path: Path) -> str:
    """Content fingerprint of a file: full sha256, or a sampled one for very large files."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
            return "sha256:" + h.hexdigest()
        # Hashing 150 GB on every open is not an option; size + mtime + both ends catch
        # replaced or re-downloaded archives in practice.
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(f.read(_EDGE_HASH_BYTES))
        f.seek(st.st_size - _EDGE_HASH_BYTES)
        h.update(f.read(_EDGE_HASH_BYTES))
    return "sampled-sha256:" + h.hexdigest()


def _cache_key(slug: str, split: str, params: dict[str, Any]) -> str:
    payload = json.dumps({"format": CACHE_FORMAT_VERSION, "split": split, **params}, sort_keys=True)
    return f"{_slug(slug)}-{split}-{hashlib.sha256(payload.encode()).hexdigest()[:24]}"


def _bad_files_error(source: str, bad: Sequence[tuple[str, str]], total: int) -> DataError:
    shown = "; ".join(f"{p} ({r})" for p, r in bad[:_MAX_LISTED])
    more = f"; and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return DataError(
        f"{len(bad)} of {total} image files of {source} cannot be read: {shown}{more}. They are not "
        "skipped, because skipping a file would shift the dataset index of every later image. Fix "
        f"or delete them, then run `instdisc data check {source}` to confirm (it lists every problem)."
    )


def _progress(total: int, desc: str, enabled: bool, unit: str = "img") -> Progress:
    return Progress(total, desc=desc, enabled=enabled and total >= _PROGRESS_MIN_ITEMS, unit=unit)


# --------------------------------------------------------------------------------------------
# Byte sources for FileImageSet (picklable; handles are opened lazily per process)
# --------------------------------------------------------------------------------------------


class _Items:
    """Bytes of the i-th image of a FileImageSet, and a human-readable location for errors."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> bytes:
        raise NotImplementedError

    def display(self, i: int) -> str:
        raise NotImplementedError


class _DirItems(_Items):
    def __init__(self, root: Path, names: list[str]) -> None:
        self.root, self.names = str(root), names

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> bytes:
        with open(os.path.join(self.root, self.names[i]), "rb") as f:
            return f.read()

    def display(self, i: int) -> str:
        return os.path.join(self.root, self.names[i])


class _ZipItems(_Items):
    def __init__(self, path: Path, members: list[str]) -> None:
        self.path, self.members = str(path), members
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.members)

    def read(self, i: int) -> bytes:
        if self._zf is None or self._pid != os.getpid():  # a forked worker needs its own handle
            self._zf, self._pid = zipfile.ZipFile(self.path), os.getpid()
        try:
            return self._zf.read(self.members[i])
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError) as e:
            raise OSError(str(e)) from None

    def display(self, i: int) -> str:
        return f"{self.path}:{self.members[i]}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zf": None, "_pid": -1}


class _TarItems(_Items):
    """Members of an *uncompressed* tar, read with pread at their data offsets."""

    def __init__(self, path: Path, names: list[str], offsets: np.ndarray, sizes: np.ndarray) -> None:
        self.path, self.names = str(path), names
        self.offsets, self.sizes = offsets, sizes
        self._fd = -1
        self._pid = -1
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> bytes:
        if self._fd < 0 or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), os.getpid()
        off, size = int(self.offsets[i]), int(self.sizes[i])
        if hasattr(os, "pread"):
            data = os.pread(self._fd, size, off)
        else:  # Windows: no pread; serialise seek+read
            with self._lock:
                os.lseek(self._fd, off, os.SEEK_SET)
                data = os.read(self._fd, size)
        if len(data) != size:
            raise OSError("member is truncated (archive shorter than its index says)")
        return data

    def display(self, i: int) -> str:
        return f"{self.path}:{self.names[i]}"

    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "_fd": -1, "_pid": -1}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Trees: a uniform view of a directory, a zip or a tar as relative POSIX paths
# --------------------------------------------------------------------------------------------

# read_many yields (name, data, None) or (name, None, reason)
_ReadResult = tuple[str, "bytes | None", "str | None"]


class _Tree:
    """A listed file tree. ``files`` maps relative POSIX paths to sizes (-1 = unknown)."""

    path: Path
    files: dict[str, int]
    dirs: set[str]
    problems: dict[str, str]  # member -> reason it can never be read (links, broken symlinks)
    random_access: bool = True
    is_archive: bool = False

    def display(self, name: str) -> str:
        raise NotImplementedError

    def fingerprint(self, names: Iterable[str]) -> str:
        raise NotImplementedError

    def read_many(self, names: Sequence[str]) -> Iterator[_ReadResult]:
        raise NotImplementedError

    def items(self, names: list[str]) -> _Items:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _DirTree(_Tree):
    """A directory, walked once (hidden entries skipped, symlinks followed, loops cut)."""

    def __init__(self, root: Path) -> None:
        self.path = root
        self.files, self.dirs, self.problems = {}, set(), {}
        self._mtimes: dict[str, int] = {}
        seen = {os.path.realpath(root)}
        stack: list[tuple[str, str]] = [("", str(root))]
        while stack:
            rel, p = stack.pop()
            try:
                entries = list(os.scandir(p))
            except OSError as e:
                raise DataError(
                    f"cannot list the folder {p} ({e.strerror or e}). Check that it exists and that "
                    "you may read it."
                ) from None
            for e in entries:
                if e.name.startswith(".") or e.name == "__MACOSX":
                    continue
                r = f"{rel}/{e.name}" if rel else e.name
                try:
                    is_dir = e.is_dir()  # follows symlinks, like ImageFolder
                except OSError:
                    is_dir = False
                if is_dir:
                    real = os.path.realpath(e.path)
                    if real in seen:  # a symlink loop (or the same folder twice)
                        continue
                    seen.add(real)
                    self.dirs.add(r)
                    stack.append((r, e.path))
                    continue
                try:
                    st = e.stat()
                    self.files[r], self._mtimes[r] = st.st_size, st.st_mtime_ns
                except OSError:
                    self.files[r], self._mtimes[r] = -1, 0
                    self.problems[r] = "unreadable (broken link or no permission)"

    def display(self, name: str) -> str:
        return str(self.path / name) if name else str(self.path)

    def fingerprint(self, names: Iterable[str]) -> str:
        h = hashlib.sha256()
        for n in names:
            h.update(f"{n}\0{self.files.get(n)}\0{self._mtimes.get(n)}\n".encode("utf-8", "surrogateescape"))
        return "dir:" + h.hexdigest()

    def read_many(self, names: Sequence[str]) -> Iterator[_ReadResult]:
        for n in names:
            try:
                with open(self.path / n, "rb") as f:
                    yield n, f.read(), None
            except OSError as e:
                yield n, None, f"unreadable ({e.strerror or e})"

    def items(self, names: list[str]) -> _Items:
        return _DirItems(self.path, names)


class _ZipTree(_Tree):
    """A zip archive (central directory listed once; members read in file order)."""

    is_archive = True

    def __init__(self, path: Path, digest: str | None = None) -> None:
        self.path, self._digest = path, digest
        self.files, self.dirs, self.problems = {}, set(), {}
        self._orig: dict[str, str] = {}
        self._offset: dict[str, int] = {}
        try:
            self._zf = zipfile.ZipFile(path)
            infos = self._zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise DataError(
                f"{path} is not a readable zip archive ({type(e).__name__}: {e}). Check that the file "
                "was copied completely (compare its size or checksum with the original)."
            ) from None
        for info in infos:
            n = _norm_member(info.filename)
            if not n:
                continue
            if info.is_dir():
                self.dirs.add(n)
                continue
            self.files[n], self._orig[n], self._offset[n] = info.file_size, info.filename, info.header_offset
        _add_parent_dirs(self.files, self.dirs)

    def display(self, name: str) -> str:
        return f"{self.path}:{name}" if name else str(self.path)

    def fingerprint(self, names: Iterable[str]) -> str:
        if self._digest is None:
            self._digest = _file_digest(self.path)
        return self._digest

    def read_many(self, names: Sequence[str]) -> Iterator[_ReadResult]:
        for n in sorted(names, key=lambda m: self._offset.get(m, -1)):  # sequential disk access
            if n not in self._orig:
                yield n, None, "missing from the archive"
                continue
            try:
                yield n, self._zf.read(self._orig[n]), None
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError, OSError, ValueError) as e:
                reason = "corrupt (bad CRC)" if "CRC" in str(e) else f"unreadable ({type(e).__name__})"
                yield n, None, reason

    def items(self, names: list[str]) -> _Items:
        return _ZipItems(self.path, [self._orig[n] for n in names])

    def close(self) -> None:
        self._zf.close()


class _TrackingReader:
    """File wrapper that remembers the last 512-byte block read, so that after tarfile stops we
    can tell a proper end-of-archive marker from a corrupt header or a truncated file (tarfile
    itself treats all three as "the end" and would silently drop the rest of the archive)."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self.f, self.name = f, name
        self.last_pos, self.last_block = -1, b""

    def read(self, n: int = -1) -> bytes:
        pos = self.f.tell()
        data = self.f.read(n)
        if n == tarfile.BLOCKSIZE:
            self.last_pos, self.last_block = pos, data
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


def _open_decompressed(path: Path) -> tuple[BinaryIO, bool]:
    """Open a (possibly gzip/bzip2/xz-compressed) file by its magic bytes -> (stream, compressed)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb"), True
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb"), True
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb"), True
    return open(path, "rb"), False


_ARCHIVE_ERRORS = (
    tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError, UnicodeError,
    NotImplementedError, OverflowError,
)


class _TarTree(_Tree):
    """A tar archive, listed in one pass.

    For a compressed tar the member bytes are kept while listing (up to 512 MiB), because a
    compressed stream cannot be read at random: a second pass would decompress everything again.
    """

    is_archive = True

    def __init__(self, path: Path, digest: str | None = None, progress: bool = False) -> None:
        self.path, self._digest = path, digest
        self.files, self.dirs, self.problems = {}, set(), {}
        self._offsets: dict[str, int] = {}
        self._buffer: dict[str, bytes] | None = {}
        self._buffered_bytes = 0
        try:
            stream, self.compressed = _open_decompressed(path)
        except OSError as e:
            raise DataError(f"cannot open {path} ({e.strerror or e}).") from None
        self.random_access = not self.compressed
        try:
            with stream:
                self._list(stream, progress)
        except DataError:
            raise
        except _ARCHIVE_ERRORS as e:
            raise DataError(
                f"{path} is not a readable tar archive ({type(e).__name__}: {e}). If it was "
                "downloaded or copied, it may be incomplete: compare its size or checksum with the "
                "original. Supported archives: .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz and .zip."
            ) from None
        _add_parent_dirs(self.files, self.dirs)

    def _list(self, stream: BinaryIO, progress: bool) -> None:
        tracker = _TrackingReader(stream, str(self.path))
        tf = tarfile.open(fileobj=tracker, mode="r:")  # type: ignore[call-overload]
        if progress and self.path.stat().st_size > _FULL_HASH_LIMIT:
            print(f"instdisc: listing {self.path} ...", file=sys.stderr, flush=True)
        for m in tf:
            n = _norm_member(m.name)
            if not n:
                continue
            if m.isdir():
                self.dirs.add(n)
                continue
            if not m.isreg():
                # Links and devices are not followed; an image-named one is reported, not dropped.
                self.files[n] = -1
                self.problems[n] = "link or special member (not supported inside archives)"
                continue
            self.files[n], self._offsets[n] = m.size, m.offset_data
            self.problems.pop(n, None)
            if self.compressed and self._buffer is not None:
                if self._buffered_bytes + m.size > _TAR_BUFFER_LIMIT:
                    self._buffer = None  # too big to hold: read again by streaming if needed
                else:
                    fobj = tf.extractfile(m)
                    assert fobj is not None
                    data = fobj.read()
                    if len(data) != m.size:
                        raise tarfile.ReadError(f"member {m.name} is truncated")
                    self._buffer[n] = data
                    self._buffered_bytes += m.size
        # tarfile stops quietly at a bad header or at EOF; only a zero block is a real end.
        if tracker.last_pos != tf.offset or len(tracker.last_block) < tarfile.BLOCKSIZE:
            raise DataError(
                f"{self.path} ends without the tar end-of-archive marker: the file is truncated "
                f"(it stops after {len(self.files)} members). Copy or download it again."
            )
        if tracker.last_block.count(0) != tarfile.BLOCKSIZE:
            raise DataError(
                f"{self.path} has a corrupt tar header at byte {tf.offset} (after {len(self.files)} "
                "members); the rest of the archive cannot be read. Copy or download it again."
            )
        if self.compressed:  # read to the end so gzip/bz2/xz verify their checksum and length
            while stream.read(2**20):
                pass

    def display(self, name: str) -> str:
        return f"{self.path}:{name}" if name else str(self.path)

    def fingerprint(self, names: Iterable[str]) -> str:
        if self._digest is None:
            self._digest = _file_digest(self.path)
        return self._digest

    def read_many(self, names: Sequence[str]) -> Iterator[_ReadResult]:
        wanted = list(names)
        if self._buffer is not None and all(n in self._buffer for n in wanted):
            for n in wanted:
                yield n, self._buffer[n], None
            return
        missing = [n for n in wanted if n not in self._offsets]
        for n in missing:
            yield n, None, "missing from the archive"
        order = sorted((n for n in wanted if n in self._offsets), key=self._offsets.__getitem__)
        if not self.compressed:
            with open(self.path, "rb") as f:
                for n in order:
                    f.seek(self._offsets[n])
                    data = f.read(self.files[n])
                    yield (n, data, None) if len(data) == self.files[n] else (n, None, "truncated")
            return
        # compressed and not buffered: one streaming pass, stopping after the last wanted member
        todo = set(order)
        try:
            stream, _ = _open_decompressed(self.path)
            with stream, tarfile.open(fileobj=stream, mode="r:") as tf:  # type: ignore[call-overload]
                for m in tf:
                    n = _norm_member(m.name)
                    if n in todo and m.isreg():
                        fobj = tf.extractfile(m)
                        assert fobj is not None
                        todo.discard(n)
                        yield n, fobj.read(), None
                        if not todo:
                            break
        except _ARCHIVE_ERRORS as e:
            for n in sorted(todo):
                yield n, None, f"unreadable ({type(e).__name__})"
            todo.clear()
        for n in sorted(todo):
            yield n, None, "missing from the archive"

    def items(self, names: list[str]) -> _Items:
        if self.compressed:
            raise DataError(
                f"{self.path} holds large images in a compressed tar, which cannot be read at "
                "random without decompressing it again for every image. Decompress it once "
                "(e.g. `gunzip -k FILE.tar.gz`, which keeps it a single .tar file) or extract it, and "
                "pass that instead -- or pass in_memory=True to decode everything into the array "
                "cache (only sensible if it fits in memory/disk)."
            )
        return _TarItems(
            self.path, names,
            np.array([self._offsets[n] for n in names], dtype=np.int64),
            np.array([self.files[n] for n in names], dtype=np.int64),
        )


def _add_parent_dirs(files: dict[str, int], dirs: set[str]) -> None:
    for n in list(files):
        parts = n.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:k]))


_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")


def _open_archive(path: Path, digest: str | None, progress: bool) -> _Tree:
    """List an archive file, choosing the format by extension (or by content otherwise)."""
    low = path.name.lower()
    if low.endswith(".zip"):
        return _ZipTree(path, digest)
    if low.endswith(_TAR_SUFFIXES):
        return _TarTree(path, digest, progress)
    try:
        if zipfile.is_zipfile(path):
            return _ZipTree(path, digest)
        with open(path, "rb") as f:
            head = f.read(512 * 2)
        stream_is_tar = len(head) >= 512 and head[257:262] == b"ustar"
        if stream_is_tar or head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
            return _TarTree(path, digest, progress)
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}).") from None
    raise DataError(
        f"{path} is a file but not a supported source: expected a folder, a .tar/.tar.gz/.tgz/.zip "
        "archive of an image folder, or one of digits, synthetic[:N], cifar10, cifar100."
    )


# --------------------------------------------------------------------------------------------
# Layouts: which members make up a split, in which order, with which labels
# --------------------------------------------------------------------------------------------


@dataclass
class _Selection:
    """The members of one split, in dataset-index order."""

    names: list[str]
    labels: np.ndarray | None
    classes: list[str]
    fmt: str
    where: str  # display of the split's root, for messages
    missing: list[str] | None = None  # PIC map entries absent from the zip


def _children(files: Iterable[str], dirs: Iterable[str], base: str) -> tuple[set[str], list[str]]:
    """Immediate sub-folders and direct files of ``base`` ('' or ending with '/')."""
    subdirs: set[str] = set()
    direct: list[str] = []
    for d in dirs:
        if d.startswith(base) and d != base.rstrip("/"):
            subdirs.add(d[len(base):].split("/", 1)[0])
    for f in files:
        if f.startswith(base):
            rest = f[len(base):]
            if "/" in rest:
                subdirs.add(rest.split("/", 1)[0])
            else:
                direct.append(f)
    return subdirs, direct


def _visible(tree: _Tree) -> tuple[list[str], set[str]]:
    files = [f for f in tree.files if not _is_hidden(f)]
    dirs = {d for d in tree.dirs if not _is_hidden(d)}
    return files, dirs


def _imagefolder_prefix(tree: _Tree, files: list[str], dirs: set[str]) -> str:
    """An archive may wrap its tree in one top-level folder (``cifar10/train/...``); skip it.

    Not done when that folder is a split folder, or when it directly holds the images (then it
    is the only class folder of a one-class source)."""
    if not tree.is_archive or not files:
        return ""
    tops = {p.split("/", 1)[0] for p in files} | {d.split("/", 1)[0] for d in dirs}
    if len(tops) != 1 or any("/" not in f for f in files):
        return ""
    top = next(iter(tops))
    if top in _SPLIT_DIRS:
        return ""
    if not any("/" in f[len(top) + 1:] for f in files):
        return ""
    return top + "/"


def _split_base(tree: _Tree, split: str) -> str | None:
    """Root (relative, '' or ending in '/') of ``split`` in an ImageFolder tree; None if absent."""
    files, dirs = _visible(tree)
    prefix = _imagefolder_prefix(tree, files, dirs)
    sub, _ = _children(files, dirs, prefix)
    if sub & set(_SPLIT_DIRS):
        if split == "train":
            return prefix + "train/" if "train" in sub else None
        for d in ("test", "val"):
            if d in sub:
                return prefix + d + "/"
        return None
    return prefix if split == "train" else None


def _imagefolder(tree: _Tree, split: str) -> _Selection:
    """Members of an ImageFolder split: sorted classes, sorted files within a class."""
    files, dirs = _visible(tree)
    where = tree.display("")
    if not files and not dirs:
        raise DataError(f"{where} is empty: it holds no images (nor folders of images).")
    base = _split_base(tree, split)
    if base is None:
        prefix = _imagefolder_prefix(tree, files, dirs)
        sub, _ = _children(files, dirs, prefix)
        if split == "train":
            raise DataError(
                f"{tree.display(prefix)} has {'/, '.join(sorted(sub & set(_SPLIT_DIRS)))}/ but no "
                "train/ folder. Put the training images in train/<class>/."
            )
        if sub & set(_SPLIT_DIRS):
            raise DataError(
                f"{tree.display(prefix)} has a train/ folder but no test/ or val/ folder, so it has "
                "no test split. Add test/<class>/ images, or give a separate evaluation source."
            )
        raise DataError(
            f"{where} has no train/ and test/ (or val/) sub-folders, so the whole source is the train "
            "split and there is no test split. Arrange it as train/<class>/... and test/<class>/..., "
            "or give a separate evaluation source."
        )
    groups: dict[str, list[str]] = defaultdict(list)
    direct: list[str] = []
    for f in files:
        if not f.startswith(base):
            continue
        rest = f[len(base):]
        if "/" in rest:
            if _is_image_name(f):
                groups[rest.split("/", 1)[0]].append(f)
        elif _is_image_name(f):
            direct.append(f)
    class_dirs, _ = _children(files, dirs, base)
    root = tree.display(base.rstrip("/"))
    if class_dirs and direct:
        raise DataError(
            f"{root} mixes images ({', '.join(sorted(direct)[:3])}...) with class folders "
            f"({', '.join(sorted(class_dirs)[:3])}...). Put every image inside a class folder, or "
            "remove the class folders for an unlabelled source."
        )
    if not class_dirs:
        if not direct:
            raise DataError(
                f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case). "
                "Expected <class>/<image> files, or images directly in the folder for an unlabelled source."
            )
        return _Selection(sorted(direct), None, [], "imagefolder-unlabelled", root)
    classes = sorted(class_dirs)
    empty = [tree.display(base + c) for c in classes if not groups.get(c)]
    if empty:
        raise DataError(
            f"{len(empty)} class folder(s) of {root} contain no images: {', '.join(empty[:_MAX_LISTED])}"
            f"{' ...' if len(empty) > _MAX_LISTED else ''}. Add images (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}) or delete the empty folders."
        )
    names: list[str] = []
    labels: list[int] = []
    for k, c in enumerate(classes):
        members = sorted(groups[c])
        names.extend(members)
        labels.extend([k] * len(members))
    return _Selection(names, np.asarray(labels, dtype=np.int64), classes, "imagefolder", root)


# -- PIC zipped layout -----------------------------------------------------------------------

_PIC_FILES = {"train": [("train.zip", "train_map.txt")], "test": [("val.zip", "val_map.txt"), ("test.zip", "test_map.txt")]}


def _is_pic_dir(path: Path) -> bool:
    return (path / "train.zip").is_file() and (path / "train_map.txt").is_file()


def _pic_files(path: Path, split: str) -> tuple[Path, Path] | None:
    for z, m in _PIC_FILES[split]:
        if (path / z).is_file() and (path / m).is_file():
            return path / z, path / m
    return None


def _read_pic_map(map_path: Path) -> tuple[list[str], list[int]]:
    try:
        text = map_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {map_path} ({e}). It must be UTF-8 text: relative/path<TAB>label per line.") from None
    paths: list[str] = []
    labels: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit("\t", 1) if "\t" in line else line.rsplit(None, 1)
        try:
            if len(parts) != 2:
                raise ValueError
            lab = int(parts[1])
            if lab < 0:
                raise ValueError
        except ValueError:
            raise DataError(
                f"{map_path} line {lineno} is not 'relative/path<TAB>label' with a label >= 0: {line[:120]!r}."
            ) from None
        paths.append(_norm_member(parts[0].strip()))
        labels.append(lab)
    if not paths:
        raise DataError(f"{map_path} lists no images. Each line must be 'relative/path<TAB>label'.")
    return paths, labels


def _pic_classes(train_paths: list[str], train_labels: list[int], num: int) -> list[str]:
    """Class names for labels 0..num-1: the folder name the train map uses for a label when that is
    unambiguous (``n01440764/...`` -> ``n01440764``), else the label number."""
    names: dict[int, set[str]] = defaultdict(set)
    for p, lab in zip(train_paths, train_labels, strict=True):
        names[lab].add(p.split("/", 1)[0] if "/" in p else "")
    out = []
    for k in range(num):
        s = names.get(k, set())
        out.append(next(iter(s)) if len(s) == 1 and "" not in s else str(k))
    return out


def _pic_selection(path: Path, split: str) -> tuple[_ZipTree, _Selection, Path]:
    found = _pic_files(path, split)
    if found is None:
        raise DataError(
            f"{path} has PIC's zipped layout (train.zip + train_map.txt) but no val.zip + val_map.txt "
            "(or test.zip + test_map.txt), so it has no test split. Add them or give a separate "
            "evaluation source."
        )
    zpath, mpath = found
    paths, labels = _read_pic_map(mpath)
    tree = _ZipTree(zpath)
    # Map paths are relative to the zip root; tolerate a zip that wraps them in one folder.
    tops = {n.split("/", 1)[0] for n in tree.files}
    prefix = ""
    if paths[0] not in tree.files and len(tops) == 1 and (next(iter(tops)) + "/" + paths[0]) in tree.files:
        prefix = next(iter(tops)) + "/"
    names = [prefix + p for p in paths]
    missing = [n for n in names if n not in tree.files]
    # class names come from the train map, so that both splits name (and count) classes alike
    tr_paths, tr_labels = (paths, labels) if split == "train" else _read_pic_map(path / "train_map.txt")
    num = max(max(labels), max(tr_labels)) + 1
    classes = _pic_classes(tr_paths, tr_labels, num)
    sel = _Selection(names, np.asarray(labels, dtype=np.int64), classes, "pic-zip", str(zpath), missing)
    return tree, sel, mpath


# -- CIFAR python batches ---------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarFormat:
    name: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str


_CIFAR_FORMATS = {
    "cifar10": _CifarFormat(
        "cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        "batches.meta", "labels", "label_names",
    ),
    "cifar100": _CifarFormat(
        "cifar100", "cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names",
    ),
}


def _detect_cifar(tree: _Tree) -> tuple[_CifarFormat, str] | None:
    """A CIFAR batch folder at the root of the tree or one level down -> (format, prefix)."""
    prefixes = [""] + sorted(d + "/" for d in tree.dirs if "/" not in d)
    for prefix in prefixes:
        for fmt in _CIFAR_FORMATS.values():
            if prefix + fmt.meta in tree.files and prefix + fmt.train[0] in tree.files:
                return fmt, prefix
    return None


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; unpickling runs code, so only numpy arrays and plain containers
    are allowed -- a malicious 'batch' cannot execute anything."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core"):  # numpy >= 2 renamed numpy.core; avoid its warning
            try:
                return getattr(importlib.import_module("numpy._core" + module[len("numpy.core"):]), name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # anything a damaged pickle can raise
        raise DataError(
            f"{where} is not a readable CIFAR python batch ({type(e).__name__}: {e}). Download the "
            "official archive again (or pass --download to fetch it)."
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a CIFAR python batch (it holds a {type(obj).__name__}, not a dict).")
    # Python-2 pickles have bytes keys; re-pickled ones may have str keys.
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_cifar(tree: _Tree, fmt: _CifarFormat, prefix: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images ``(N, 32, 32, 3)``, labels and class names of one CIFAR split."""
    wanted = [prefix + f for f in (fmt.train if split == "train" else fmt.test)] + [prefix + fmt.meta]
    absent = [tree.display(n) for n in wanted if n not in tree.files]
    if absent:
        raise DataError(
            f"incomplete {fmt.name} python batches: missing {', '.join(absent)}. Download the official "
            "archive again (pass --download, or delete the folder first)."
        )
    blobs: dict[str, bytes] = {}
    for n, data, reason in tree.read_many(wanted):
        if data is None:
            raise DataError(f"cannot read {tree.display(n)}: {reason}.")
        blobs[n] = data
    meta = _unpickle(blobs[prefix + fmt.meta], tree.display(prefix + fmt.meta))
    raw_names = meta.get(fmt.names_key)
    if not isinstance(raw_names, list | tuple) or not raw_names:
        raise DataError(f"{tree.display(prefix + fmt.meta)} has no {fmt.names_key!r} list.")
    classes = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in raw_names]
    images, labels = [], []
    for n in wanted[:-1]:
        where = tree.display(n)
        d = _unpickle(blobs.pop(n), where)
        try:
            arr = np.asarray(d["data"])
            lab = np.asarray(d[fmt.label_key], dtype=np.int64).reshape(-1)
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{where} is not a CIFAR batch (missing or bad {e}).") from None
        if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != 3072 or len(lab) != len(arr):
            raise DataError(
                f"{where} is not a CIFAR batch: expected data (N, 3072) uint8 and N labels, got "
                f"{arr.shape} {arr.dtype} and {len(lab)} labels."
            )
        if len(lab) and (lab.min() < 0 or lab.max() >= len(classes)):
            raise DataError(f"{where} has labels outside 0..{len(classes) - 1}.")
        # rows are 1024 R, 1024 G, 1024 B values of a row-major 32x32 image
        images.append(arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes


# --------------------------------------------------------------------------------------------
# CIFAR download
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarDownload:
    """Where an official CIFAR tarball lives and what it must hash to.

    Attributes:
        url: ``https://`` (or, for tests and mirrors, ``file://``) URL of the tarball.
        md5: expected md5 hex digest (published by the dataset's authors).
        folder: the single top-level folder inside the tarball.
    """

    url: str
    md5: str
    folder: str


CIFAR_DOWNLOADS: dict[str, CifarDownload] = {
    "cifar10": CifarDownload(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": CifarDownload(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
}


def _cifar_complete(folder: Path, fmt: _CifarFormat) -> bool:
    return all((folder / f).is_file() for f in (*fmt.train, *fmt.test, fmt.meta))


def download_cifar(name: str, root: str | Path, *, progress: bool = True) -> Path:
    """Download, verify and extract an official CIFAR tarball into ``root``.

    The md5 is checked *before* anything is extracted; a mismatch removes the download. Members
    are extracted one by one into a staging folder after checking that they are plain files or
    folders under the expected top-level folder (no absolute paths, ``..`` or links), and the
    folder is moved into place only when complete. The tarball is deleted afterwards.

    Args:
        name: ``"cifar10"`` or ``"cifar100"`` (a key of `CIFAR_DOWNLOADS`).
        root: folder that receives ``cifar-10-batches-py/`` (resp. ``cifar-100-python/``).
        progress: print a progress line on stderr.

    Returns:
        The extracted batch folder.

    Raises:
        DataError: network error, checksum mismatch or unsafe/corrupt archive.
    """
    spec = CIFAR_DOWNLOADS[name]
    root = Path(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    fname = spec.url.rstrip("/").rsplit("/", 1)[-1] or f"{name}.tar.gz"
    tmp = root / f".{fname}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
    staging = root / f".extract-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def cleanup() -> None:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            try:
                root.rmdir()  # only if empty: never remove anything we did not create
            except OSError:
                pass

    try:
        md5 = hashlib.md5()
        try:
            with urllib.request.urlopen(spec.url, timeout=60) as resp, open(tmp, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0)
                bar = Progress(total, desc=f"download {fname}", enabled=progress, unit="B")
                for chunk in iter(lambda: resp.read(2**20), b""):
                    md5.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
                bar.close()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DataError(
                f"could not download {spec.url} ({getattr(e, 'reason', None) or e}). Check the network, "
                f"or download it by hand, extract it and pass the folder holding {spec.folder}/ as the "
                "data path."
            ) from None
        if md5.hexdigest() != spec.md5:
            raise DataError(
                f"the download of {spec.url} is corrupt: md5 {md5.hexdigest()} instead of {spec.md5}. "
                "It was deleted; try again (a proxy or an interrupted transfer can cause this)."
            )
        _safe_extract(tmp, staging, spec.folder)
        target = root / spec.folder
        if target.exists():  # an incomplete earlier copy in our own cache
            shutil.rmtree(target)
        os.replace(staging / spec.folder, target)
    except BaseException:
        cleanup()
        raise
    tmp.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    return root / spec.folder


def _safe_extract(tar_path: Path, dest: Path, top: str) -> None:
    """Extract only regular files and folders under ``top/``, refusing anything that could
    escape ``dest`` (absolute paths, ``..``, links, devices)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path, "r:*") as tf:
            for m in tf:
                raw = m.name
                norm = posixpath.normpath(raw)
                parts = norm.split("/")
                if (
                    raw.startswith("/") or "\\" in raw or ".." in parts or ":" in parts[0]
                    or parts[0] != top or not (m.isreg() or m.isdir())
                ):
                    raise DataError(
                        f"refusing to extract {tar_path.name}: unexpected member {raw!r} (only files "
                        f"and folders under {top}/ are allowed). The file is not the official archive."
                    )
                target = dest.joinpath(*parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                assert src is not None
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 2**20)
    except DataError:
        raise
    except _ARCHIVE_ERRORS as e:
        raise DataError(f"cannot extract {tar_path.name} ({type(e).__name__}: {e}); the download is damaged.") from None


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
    """sklearn digits -> (N, 32, 32, 3) uint8 (see the module docstring for the split)."""
    from sklearn.datasets import load_digits  # slow import: only when the cache is cold

    d = load_digits()
    idx = np.arange(len(d.images))
    sel = idx % 5 == 0 if split == "test" else idx % 5 != 0
    m = _bilinear_matrix(32, 8)
    up = np.einsum("ij,njk,lk->nil", m, d.images[sel] * (255.0 / 16.0), m)
    grey = np.clip(np.rint(up), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), d.target[sel].astype(np.int64), [str(c) for c in range(10)]


SYNTHETIC_CLASSES = ("disk", "square", "triangle", "ring", "hbar", "vbar", "plus", "x", "stripes", "checker")
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
    table = np.stack([
        np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
        np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1),
    ])
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
            raise DataError(f"{spec!r}: synthetic:N needs a positive whole number N, e.g. synthetic:512.")
        return "synthetic", n
    return None


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
        out = ArrayImageSet(images, labels, info["classes"], name=name, split=split,
                            meta={**info["meta"], "source": name, "cache_key": key, "cached": True})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    out._cache_file = str(d / f"{key}.npy")
    return out


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)  # readers see the old file or the complete new one, never a part
    finally:
        tmp.unlink(missing_ok=True)


def _save_arrays(
    cache_dir: Path, key: str, images: np.ndarray, labels: np.ndarray | None, classes: list[str],
    *, name: str, split: str, meta: dict[str, Any],
) -> ArrayImageSet:
    """Write the cache entry (images, labels, then the JSON that marks it complete) and return it
    memory-mapped. If the cache is not writable the set is returned in memory with a warning."""
    d = _arrays_dir(cache_dir)
    info = {
        "format": CACHE_FORMAT_VERSION, "name": name, "split": split, "classes": classes,
        "shape": list(images.shape), "labelled": labels is not None, "meta": meta,
    }
    try:
        d.mkdir(parents=True, exist_ok=True)
        _write_atomic(d / f"{key}.npy", lambda f: np.save(f, images, allow_pickle=False))
        if labels is not None:
            _write_atomic(d / f"{key}.labels.npy", lambda f: np.save(f, labels, allow_pickle=False))
        _write_atomic(d / f"{key}.json", lambda f: f.write(json.dumps(info, indent=1).encode()))
    except OSError as e:
        warnings.warn(f"instdisc: cannot write the image cache in {d} ({e}); keeping {name} in memory.", stacklevel=3)
        return ArrayImageSet(images, labels, classes, name=name, split=split, meta={**meta, "cache_key": key})
    out = _load_cached(cache_dir, key, name, split)
    if out is None:  # pragma: no cover - only if the file vanished between write and read
        raise DataError(f"the cache entry {d / key}.npy disappeared right after it was written.")
    out.meta["cached"] = False
    return out


# --------------------------------------------------------------------------------------------
# Decoding many members
# --------------------------------------------------------------------------------------------


def _decode_members(
    tree: _Tree, names: Sequence[str], *, progress: bool, desc: str,
) -> Iterator[tuple[str, Image.Image | None, str | None, str | None]]:
    """Decode every member fully -> (name, rgb image | None, original mode | None, bad reason | None).

    Used by `open_source` and `instdisc.datacheck.check_source`, so both judge files the same way.
    Yields in the tree's efficient read order, not necessarily in ``names`` order.
    """
    problems = tree.problems
    bar = _progress(len(names), desc, progress)
    readable = [n for n in names if n not in problems]
    for n in names:
        if n in problems:
            bar.update()
            yield n, None, None, problems[n]
    for n, data, reason in tree.read_many(readable):
        bar.update()
        if data is None:
            yield n, None, None, reason
            continue
        try:
            img, mode = decode_image(data)
        except BadImageError as e:
            yield n, None, None, e.reason
            continue
        yield n, img, mode, None
    bar.close()


def _structural_bad(tree: _Tree, sel: _Selection) -> list[tuple[str, str]]:
    """Problems visible without decoding: missing, empty or link members."""
    bad = [(tree.display(n), "missing from the archive") for n in (sel.missing or [])]
    missing = set(sel.missing or [])
    for n in dict.fromkeys(sel.names):
        if n in missing:
            continue
        if n in tree.problems:
            bad.append((tree.display(n), tree.problems[n]))
        elif tree.files.get(n) == 0:
            bad.append((tree.display(n), "empty"))
    return bad


def _decode_to_array(
    tree: _Tree, sel: _Selection, image_size: int | None, *, progress: bool, desc: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a whole split into one ``(N, H, W, 3)`` array (raising DataError on any bad file)."""
    unique = list(dict.fromkeys(sel.names))
    decoded: dict[str, np.ndarray] = {}
    bad: list[tuple[str, str]] = []
    for n, img, _mode, reason in _decode_members(tree, unique, progress=progress, desc=desc):
        if img is None:
            bad.append((tree.display(n), reason or "unreadable"))
        else:
            decoded[n] = np.asarray(img)
    if bad:
        rank = {tree.display(n): i for i, n in enumerate(unique)}
        bad.sort(key=lambda b: rank.get(b[0], -1))  # report in dataset order
        raise _bad_files_error(str(tree.path), bad, len(unique))
    sizes = Counter(a.shape[:2] for a in decoded.values())
    if image_size:
        target = (image_size, image_size)
    elif len(sizes) == 1:
        target = next(iter(sizes))
    else:  # most common size; ties go to the larger one so nothing is needlessly shrunk
        target = max(sizes, key=lambda hw: (sizes[hw], hw[0] * hw[1], hw))
    out = np.empty((len(sel.names), target[0], target[1], 3), dtype=np.uint8)
    resized = 0
    first_pos: dict[str, int] = {}
    for i, n in enumerate(sel.names):
        if n in first_pos:  # a PIC map may list a file twice
            out[i] = out[first_pos[n]]
            continue
        first_pos[n] = i
        a = decoded.pop(n)
        if a.shape[:2] != target:
            a = np.asarray(fit_image(Image.fromarray(a), target))
            resized += 1
        out[i] = a
    return out, {"resized": resized, "sizes": {f"{h}x{w}": c for (h, w), c in sizes.most_common(5)}}


def _probe_small(tree: _Tree, names: Sequence[str]) -> bool:
    """True when the probed images are all <= SMALL_IMAGE_MAX_SIDE px on their longest side.

    Random-access trees are probed at evenly spaced indices; a compressed tar at its first members
    (anything else would decompress the whole archive)."""
    cand = [n for n in names if n not in tree.problems]
    if not cand:
        return True
    if tree.random_access:
        step = max(1, len(cand) // _PROBE_COUNT)
        sample = cand[::step][:_PROBE_COUNT]
    else:
        sample = cand[:_PROBE_COUNT]
    sizes = [s for _, data, _ in tree.read_many(sample) if data is not None for s in [_probe_size(data)] if s]
    return all(max(s) <= SMALL_IMAGE_MAX_SIDE for s in sizes)


# --------------------------------------------------------------------------------------------
# open_source
# --------------------------------------------------------------------------------------------


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'test', not {split!r}.")
    return split


def _missing_path_error(spec: str, path: Path) -> DataError:
    return DataError(
        f"data source {spec!r} not found: {path} does not exist. Give an existing folder or a "
        ".tar/.tar.gz/.tgz/.zip archive, or one of the built-in sources digits, synthetic[:N], "
        "cifar10, cifar100."
    )


def open_source(
    spec: str,
    split: str = "train",
    *,
    cache_dir: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    in_memory: bool | None = None,
    progress: bool = True,
) -> ImageSet:
    """Open one split of a data source (see the module docstring for every form of ``spec``).

    Args:
        spec: ``digits``, ``synthetic[:N]``, ``cifar10``, ``cifar100``, a folder or an archive.
        split: ``"train"`` or ``"test"``.
        cache_dir: where decoded arrays and downloads go (default `default_cache_dir`).
        download: fetch ``cifar10``/``cifar100`` from the official URL when absent.
        image_size: make every image ``image_size x image_size`` (short-side resize + centre
            crop). Default: small sources keep their size, streamed ones use 256.
        in_memory: ``True`` decodes everything into the array cache whatever the image size;
            ``False`` streams folders/archives as a `FileImageSet`; ``None`` decides by size.
        progress: print progress lines on stderr while decoding or downloading big sources.

    Returns:
        An `ArrayImageSet` (small images) or a `FileImageSet` (large images).

    Raises:
        DataError: missing, empty, malformed or partly unreadable source; bad ``split``.
    """
    _check_split(split)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive integer, not {image_size!r}.")
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("no data source given: pass a folder, an archive, or digits / synthetic[:N] / cifar10 / cifar100.")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    builtin = _parse_builtin(spec)
    if builtin is not None:
        return _open_builtin(builtin[0], builtin[1], split, cache, download, image_size, progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise _missing_path_error(spec, path)
    path = path.resolve()
    name = str(path)
    if path.is_dir():
        if _is_pic_dir(path):
            ztree, sel, map_path = _pic_selection(path, split)
            try:
                fp = hashlib.sha256((ztree.fingerprint([]) + _file_digest(map_path)).encode()).hexdigest()
                return _materialise(ztree, sel, name=name, split=split, cache=cache, fp=fp,
                                    image_size=image_size, in_memory=in_memory, progress=progress)
            finally:
                ztree.close()
        tree: _Tree = _DirTree(path)
        digest = None
    elif path.is_file():
        digest = _file_digest(path)
        if in_memory is not False:  # a hit must not pay for listing the archive
            hit = _load_cached(cache, _cache_key(path.name, split, {"source": digest, "image_size": image_size}), name, split)
            if hit is not None:
                return hit
        tree = _open_archive(path, digest, progress)
    else:
        raise DataError(f"{path} is neither a folder nor a file.")
    try:
        result = _open_tree_split(tree, split, name=name, cache=cache, image_size=image_size,
                                  in_memory=in_memory, progress=progress)
        if tree.is_archive and isinstance(result, ArrayImageSet) and not result.meta.get("cached"):
            # Listing an archive is the slow part of a cold open (seconds for CIFAR-sized tars) and
            # the other split is nearly always opened next: decode it now, while it is listed.
            other = "test" if split == "train" else "train"
            try:
                _open_tree_split(tree, other, name=name, cache=cache, image_size=image_size,
                                 in_memory=in_memory, progress=progress)
            except DataError:
                pass  # absent or broken: reported when (if) that split itself is opened
        return result
    finally:
        tree.close()


def _open_tree_split(
    tree: _Tree, split: str, *, name: str, cache: Path, image_size: int | None,
    in_memory: bool | None, progress: bool,
) -> ImageSet:
    """One split of a listed folder or archive (CIFAR batches or an ImageFolder)."""
    cifar = _detect_cifar(tree)
    if cifar is not None:
        fmt, prefix = cifar
        names = [prefix + f for f in (*fmt.train, *fmt.test, fmt.meta)]
        key = _cache_key(tree.path.name, split, {"source": tree.fingerprint(names), "image_size": image_size})
        return _cached_or_build(
            cache, key, name, split, image_size,
            lambda: (*_read_cifar(tree, fmt, prefix, split), {"format": f"{fmt.name}-python", "source": name}),
        )
    sel = _imagefolder(tree, split)
    return _materialise(tree, sel, name=name, split=split, cache=cache, fp=tree.fingerprint(sel.names),
                        image_size=image_size, in_memory=in_memory, progress=progress)


def _materialise(
    tree: _Tree, sel: _Selection, *, name: str, split: str, cache: Path, fp: str,
    image_size: int | None, in_memory: bool | None, progress: bool,
) -> ImageSet:
    """Turn a listed split into an ArrayImageSet (decoded + cached) or a FileImageSet."""
    key = _cache_key(tree.path.name, split, {"source": fp, "image_size": image_size})
    if in_memory is not False:
        hit = _load_cached(cache, key, name, split)
        if hit is not None:
            return hit
    small = in_memory if in_memory is not None else _probe_small(tree, sel.names)
    meta = {"format": sel.fmt, "source": name}
    if not small:
        # Streaming decodes nothing now, but what is visibly broken (empty, missing, link
        # members) is refused now rather than an hour into training.
        bad = _structural_bad(tree, sel)
        if bad:
            raise _bad_files_error(name, bad, len(sel.names))
        return FileImageSet(tree.items(sel.names), sel.labels, sel.classes, name=name, split=split,
                            image_size=image_size, meta=meta)
    images, extra = _decode_to_array(tree, sel, image_size, progress=progress,
                                     desc=f"decode {Path(name).name} [{split}]")
    return _save_arrays(cache, key, images, sel.labels, sel.classes, name=name, split=split,
                        meta={**meta, **extra})


def _resize_all(images: np.ndarray, image_size: int | None) -> np.ndarray:
    if not image_size or images.shape[1:3] == (image_size, image_size):
        return images
    out = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for i, a in enumerate(images):
        out[i] = np.asarray(fit_image(Image.fromarray(a), (image_size, image_size)))
    return out


def _cached_or_build(
    cache: Path, key: str, name: str, split: str, image_size: int | None,
    build: Callable[[], tuple[np.ndarray, np.ndarray | None, list[str], dict[str, Any]]],
) -> ArrayImageSet:
    hit = _load_cached(cache, key, name, split)
    if hit is not None:
        return hit
    images, labels, classes, meta = build()
    return _save_arrays(cache, key, _resize_all(images, image_size), labels, classes, name=name, split=split, meta=meta)


def _open_builtin(
    kind: str, n: int | None, split: str, cache: Path, download: bool, image_size: int | None, progress: bool,
) -> ArrayImageSet:
    if kind == "digits":
        key = _cache_key("digits", split, {"version": DIGITS_VERSION, "image_size": image_size})
        return _cached_or_build(cache, key, "digits", split, image_size,
                                lambda: (*_make_digits(split), {"format": "digits"}))
    if kind == "synthetic":
        assert n is not None
        count = n if split == "train" else max(1, n // 4)
        name = "synthetic" if n == SYNTHETIC_DEFAULT_N else f"synthetic:{n}"
        key = _cache_key("synthetic", split, {"version": SYNTHETIC_VERSION, "n": count, "image_size": image_size})
        return _cached_or_build(cache, key, name, split, image_size,
                                lambda: (*_make_synthetic(count, split), {"format": "synthetic"}))
    fmt = _CIFAR_FORMATS[kind]
    root = cache / kind
    if not (_cifar_complete(root / fmt.folder, fmt) or _cifar_complete(root, fmt)):
        if not download:
            raise DataError(
                f"{kind} is not in {root}. Pass --download (download=True) to fetch the official "
                f"archive ({CIFAR_DOWNLOADS[kind].url}), or give the path of a folder holding "
                f"{fmt.folder}/ (or an image folder / archive) as the data source."
            )
        download_cifar(kind, root, progress=progress)
    tree = _DirTree(root)
    detected = _detect_cifar(tree)
    if detected is None:  # pragma: no cover - guarded by _cifar_complete
        raise DataError(f"{root} does not hold {kind} python batches.")
    fmt, prefix = detected
    names = [prefix + f for f in (*fmt.train, *fmt.test, fmt.meta)]
    key = _cache_key(kind, split, {"source": tree.fingerprint(names), "image_size": image_size})
    return _cached_or_build(cache, key, kind, split, image_size,
                            lambda: (*_read_cifar(tree, fmt, prefix, split), {"format": f"{kind}-python"}))


# --------------------------------------------------------------------------------------------
# Package-internal entry points for instdisc.datacheck
# --------------------------------------------------------------------------------------------


@dataclass
class _SplitPlan:
    split: str
    tree: _Tree
    sel: _Selection


def _plan_file_source(spec: str, progress: bool = True) -> tuple[str, list[_SplitPlan] | dict[str, int]]:
    """Resolve a folder/archive for checking -> (display name, per-split plans), or
    (name, {split: count}) for CIFAR python batches (which have nothing to decode)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise _missing_path_error(spec, path)
    path = path.resolve()
    if path.is_dir() and _is_pic_dir(path):
        plans = []
        for split in SPLITS:
            if split == "test" and _pic_files(path, split) is None:
                continue
            tree, sel, _ = _pic_selection(path, split)
            plans.append(_SplitPlan(split, tree, sel))
        return str(path), plans
    if path.is_dir():
        tree: _Tree = _DirTree(path)
    elif path.is_file():
        tree = _open_archive(path, None, progress=progress)
    else:
        raise DataError(f"{path} is neither a folder nor a file.")
    cifar = _detect_cifar(tree)
    if cifar is not None:
        fmt, prefix = cifar
        counts = {s: len(_read_cifar(tree, fmt, prefix, s)[1]) for s in SPLITS}
        return str(path), counts
    plans = [_SplitPlan(s, tree, _imagefolder(tree, s)) for s in SPLITS if _split_base(tree, s) is not None]
    if not plans:
        _imagefolder(tree, "train")  # raises the precise error
    return str(path), plans


def _builtin_counts(spec: str, cache_dir: Path | None = None) -> dict[str, int] | None:
    """Image counts per split of a built-in source, None if ``spec`` is not built in."""
    b = _parse_builtin(spec)
    if b is None:
        return None
    kind, n = b
    if kind == "digits":
        return {"train": 1437, "test": 360}
    if kind == "synthetic":
        assert n is not None
        return {"train": n, "test": max(1, n // 4)}
    cache = cache_dir or default_cache_dir()
    fmt = _CIFAR_FORMATS[kind]
    root = cache / kind
    if not (_cifar_complete(root / fmt.folder, fmt) or _cifar_complete(root, fmt)):
        raise DataError(
            f"{kind} is not in {root}. Fetch it with `instdisc train --data {kind} --download` "
            f"(or download {CIFAR_DOWNLOADS[kind].url} by hand), or check a folder path instead."
        )
    tree = _DirTree(root)
    detected = _detect_cifar(tree)
    assert detected is not None
    fmt, prefix = detected
    return {s: len(_read_cifar(tree, fmt, prefix, s)[1]) for s in SPLITS}


"""Image sets, and the decoding of one image.

`ImageSet` is what `instdisc.sources.open_source` returns: an ordered, indexable set of RGB
images whose row ``i`` is dataset index ``i``. `ArrayImageSet` holds same-sized images in one
uint8 array (usually a memmap of the array cache, see `instdisc.sources.cache`); `FileImageSet`
decodes files or archive members on demand (large images). `decode_image` is the one definition
of "this file decodes", shared by opening, streaming and ``instdisc data check``; the pixel
conversion rules are under "Pixels" in the `instdisc.sources` docstring.
"""

from __future__ import annotations

import io
import operator
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from instdisc.errors import DataError

if TYPE_CHECKING:  # annotation only: trees build the byte sources a FileImageSet reads
    from instdisc.sources.trees import _Items

DEFAULT_FILE_IMAGE_SIZE = 256
"""Side of the images `FileImageSet.read` returns when no ``image_size`` is given."""


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

    def paths(self) -> list[str] | None:
        """Where each row comes from, in index order, or None for sources without files (digits,
        synthetic, CIFAR batches; folders decoded by an instdisc older than this record).

        Decoded folders and archives give the member names relative to the source.
        """
        files = self.meta.get("files")
        if isinstance(files, list) and len(files) == len(self) and all(isinstance(f, str) for f in files):
            return list(files)
        return None

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
            raise ValueError(
                f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}"
            )
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

    Every member is listed when the set is opened, so indices are fixed. ``read(i)`` resizes the
    short side to ``image_size`` and centre-crops a square. Without an explicit ``image_size``
    (`whole_images`), training reads ``read_crops`` instead (boxes drawn on the whole stored image,
    resized to each view's size) and evaluation ``read_eval`` (resize-256 + centre-crop-224,
    scaled); with one, every use sees the ``image_size`` squares, as an in-memory source would.
    Safe to use from forked or spawned workers (file handles are opened per process).

    Args:
        items: the byte source of each index (internal).
        labels: ``(N,)`` labels or ``None``.
        classes: class names in label order.
        name: source name.
        split: ``"train"`` or ``"test"``.
        image_size: side of the images ``read`` returns (default `DEFAULT_FILE_IMAGE_SIZE`);
            given, it also turns `whole_images` off.
        meta: free-form facts about the source.

    Attributes:
        whole_images: training views are cut from the whole stored image at decode time, and
            evaluation reads the resize-256 + centre-crop-224 view (no ``image_size`` given).
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
        # "relative name\0size" of each member, set by the opener: what identifies a streamed
        # image without reading it (`instdisc.sources.fingerprint`), independent of where it lies
        self.member_keys: list[str] | None = None
        self.whole_images = image_size is None

    def __len__(self) -> int:
        return len(self.items)

    def path(self, i: int) -> str:
        """Where image ``i`` comes from (a file path, or ``archive:member``)."""
        return self.items.display(self._check_index(i))

    def paths(self) -> list[str]:
        """`path` of every row, in index order."""
        return [self.items.display(i) for i in range(len(self))]

    def read(self, i: int) -> np.ndarray:
        """Decode image ``i`` -> ``(image_size, image_size, 3)`` uint8 RGB.

        Raises:
            DataError: the file became unreadable after the source was opened.
        """
        i = self._check_index(i)
        s = self.image_size
        img = self._decode(i, self.read_bytes(i), draft=(s, s))
        return np.array(fit_image(img, (s, s)))  # a fresh, writable array (asarray is read-only)

    def read_bytes(self, i: int) -> bytes:
        """The stored bytes of image ``i`` (raises DataError when they cannot be read)."""
        i = self._check_index(i)
        try:
            return self.items.read(i)
        except OSError as e:
            raise self._unreadable(i, f"unreadable ({e})") from None

    def size_of(self, i: int, data: bytes) -> tuple[int, int]:
        """``(width, height)`` of image ``i`` from the header of its bytes ``data`` alone."""
        wh = _probe_size(data)
        if wh is None or not wh[0] or not wh[1]:
            raise self._unreadable(i, "unreadable (no image header)")
        return wh

    def read_crops(
        self, i: int, data: bytes, boxes: Sequence[tuple[int, int, int, int]], sizes: Sequence[int]
    ) -> list[np.ndarray]:
        """Crops of image ``i``: box k ``(top, left, h, w)`` (pixels of the stored image) resized
        to ``sizes[k] x sizes[k]``, each an ``(S, S, 3)`` uint8 RGB array.

        The file is decoded once for all boxes, at the smallest JPEG DCT scale (1/2, 1/4, 1/8)
        that keeps every box at least its output size on both sides, so nothing is upsampled
        that a full decode would have downsampled; each box is then resized with Pillow's
        antialiased bilinear filter (torchvision's PIL ``resized_crop``).
        """
        i = self._check_index(i)
        w0, h0 = self.size_of(i, data)
        # The least reduction any box tolerates: its shorter side must still cover its output.
        need = max(min(1.0, s / min(b[2], b[3])) for b, s in zip(boxes, sizes, strict=True))
        img = self._decode(i, data, draft=(w0 * need, h0 * need))
        return [resized_crop(img, (w0, h0), b, s) for b, s in zip(boxes, sizes, strict=True)]

    def read_eval(self, i: int, size: int) -> np.ndarray:
        """The evaluation view of image ``i``: short side resized to ``round(size * 256 / 224)``,
        then the centre ``size x size`` crop (the usual resize-256 + centre-crop-224, scaled).
        """
        i = self._check_index(i)
        short = eval_resize_side(size)
        img = self._decode(i, self.read_bytes(i), draft=(short, short))
        return centre_view(img, short, size)

    def _decode(self, i: int, data: bytes, draft: tuple[float, float] | None) -> Image.Image:
        try:
            img, _ = decode_image(data, draft=draft)
        except BadImageError as e:
            raise self._unreadable(i, e.reason) from None
        return img

    def _unreadable(self, i: int, reason: str) -> DataError:
        return DataError(
            f"image {i} of {self.name} ({self.items.display(i)}) cannot be decoded: {reason}. "
            f"Run `instdisc data check {self.name}` to list every bad file, then fix or delete "
            "them (the source's file list is fixed when it is opened, so changes need a restart)."
        )


def eval_resize_side(size: int) -> int:
    """Short side of the evaluation resize for a ``size`` crop: 256 for 224, in proportion otherwise."""
    return max(size, round(size * 256 / 224))


def centre_view(img: Image.Image, short: int, size: int) -> np.ndarray:
    """Resize so the short side is ``short`` (antialiased bilinear), take the centre ``size`` square.

    torchvision's ``Resize(short)`` + ``CenterCrop(size)``: the long side is truncated,
    ``int(short * long / short_side)``, and the crop offset is ``round((L - size) / 2)``.
    """
    w, h = img.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return np.array(img.crop((left, top, left + size, top + size)))  # (size, size, 3), writable


def resized_crop(
    img: Image.Image, full_wh: tuple[int, int], box: tuple[int, int, int, int], size: int
) -> np.ndarray:
    """Box ``(top, left, h, w)`` of an image stored at ``full_wh``, resized to ``size x size``.

    ``img`` may be a reduced decode of that image (JPEG draft): the box is scaled to its pixels,
    as a float box, so Pillow's resampling reads the same region whatever the reduction.
    """
    top, left, h, w = (float(v) for v in box)
    sx, sy = img.size[0] / full_wh[0], img.size[1] / full_wh[1]
    region = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return np.asarray(img.resize((size, size), Image.BILINEAR, box=region))  # (size, size, 3)


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
    return (
        isinstance(e, EOFError) or "truncated" in msg or "end of file" in msg or "premature" in msg
    )


def decode_image(data: bytes, *, draft: tuple[float, float] | None = None) -> tuple[Image.Image, str]:
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


def _decode_image(data: bytes, draft: tuple[float, float] | None) -> tuple[Image.Image, str]:
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
        raise BadImageError(
            "truncated" if _is_truncation(e) else f"corrupt ({type(e).__name__})"
        ) from None
    if img.width == 0 or img.height == 0:
        raise BadImageError("empty")
    try:
        rgb = to_rgb(img)
    except Exception:
        raise BadImageError(f"unsupported mode ({mode})") from None
    return rgb, mode


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see "Pixels" in the `instdisc.sources` docstring)."""
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


def subset(images: ImageSet, keep: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> ImageSet:
    """The images at indices `keep` (ascending), relabelled `labels` under `classes`.

    Used by `instdisc.sources.classes.align_classes`; an evaluation split only (a training set's
    indices are instance labels and are never renumbered).
    """
    keep = np.asarray(keep, dtype=np.int64)
    whole = len(keep) == len(images)
    meta = {**images.meta, **({} if whole else {"dropped_unknown": len(images) - len(keep)})}
    kw = dict(name=images.name, split=images.split, meta=meta)
    if isinstance(images, ArrayImageSet):
        out = ArrayImageSet(images.images if whole else np.ascontiguousarray(images.images[keep]), labels,
                            classes, **kw)
        if whole:
            out._cache_file = images._cache_file
        return out
    if isinstance(images, FileImageSet):
        items = images.items if whole else _SubsetItems(images.items, keep)
        out = FileImageSet(items, labels, classes, image_size=images.image_size, **kw)
        keys = images.member_keys
        out.member_keys = keys if whole or keys is None else [keys[i] for i in keep]
        return out
    raise TypeError(f"cannot take a subset of {type(images).__name__}")


class _SubsetItems:
    """Some indices of another FileImageSet's byte sources (picklable, like them)."""

    def __init__(self, base: _Items, keep: np.ndarray) -> None:
        self.base, self.keep = base, keep

    def __len__(self) -> int:
        return len(self.keep)

    def read(self, i: int) -> bytes:
        return self.base.read(int(self.keep[i]))

    def display(self, i: int) -> str:
        return self.base.display(int(self.keep[i]))

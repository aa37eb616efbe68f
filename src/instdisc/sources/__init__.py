"""Dataset sources: the whole data-reading layer.

`open_source(spec, split)` turns a source specification into an `ImageSet`, whose row ``i`` is
dataset index ``i`` -- the instance label of NPID, PIC and SeLa. Everything here is therefore built
around one rule: **the order of a source is deterministic and never depends on what decodes**.
Class folders and file names are sorted; a file that cannot be decoded is never skipped (that
would shift the index of every later image); opening such a source raises `DataError` listing the
bad files and pointing at ``instdisc data check PATH``.

Modules
-------
``images``
    `ImageSet`, `ArrayImageSet`, `FileImageSet`; decoding one image (`decode_image`, `fit_image`).
``trees``
    Folders, zips and tars, listed once and read without extracting.
``layouts``
    Which members form a split, in which order: ImageFolder, and PIC's zip + map.
``cifar``
    CIFAR python batches: reading them, and the verified download.
``builtin``
    scikit-learn digits and the synthetic source.
``decode``
    Decoding a whole split, the bad-file report, the small-or-large probe.
``cache``
    The uint8 ``.npy`` array cache.
``classes``
    Class numbering, and the mapping of an evaluation split onto the training split's classes.
this package
    `open_source`, which picks the reader for a spec; `open_eval_split`, an evaluation split
    with the training split's label ids; the entry points of ``instdisc data check``.

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
      order; images are read from the zip without extracting; naming ``train.zip`` itself (next to
      its map) means the same layout;
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
Unless ``image_size`` is given, training crops them at decode time: ``read_crops(i, ...)``
resizes boxes drawn on the whole stored image (see `instdisc.loader`), decoding JPEGs at the DCT
scale the boxes allow; evaluation reads ``read_eval(i, size)``, the short side resized to
``round(size * 256 / 224)`` and the centre ``size x size`` crop. ``read(i)`` (previews, reports,
and every use when ``image_size`` is given) resizes the short side to ``image_size`` (default
256) with bilinear filtering and centre-crops a square. Large images inside a
*compressed* tar cannot be read at random; that case raises `DataError` suggesting to decompress
(``gunzip``) or extract the archive.

``image_size`` given => every image of every source (built-ins included) is stored/returned as
``image_size x image_size`` (short side resized, centre crop), and training and evaluation start
from those squares, streamed or not.

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

import hashlib
from dataclasses import dataclass
from pathlib import Path

from instdisc.errors import DataError
from instdisc.sources.builtin import (
    DIGITS_VERSION,
    SYNTHETIC_DEFAULT_N,
    SYNTHETIC_VERSION,
    _make_digits,
    _make_synthetic,
    _parse_builtin,
)
from instdisc.sources.cache import (
    _cache_key,
    _cached_or_build,
    _load_cached,
    _save_arrays,
    default_cache_dir,
)
from instdisc.sources.cifar import (
    _CIFAR_FORMATS,
    CIFAR_DOWNLOADS,
    CifarDownload,
    _cifar_complete,
    _detect_cifar,
    _read_cifar,
    download_cifar,
)
from instdisc.sources.classes import align_classes, class_ids
from instdisc.sources.decode import (
    _bad_files_error,
    _decode_to_array,
    _probe_small,
    _structural_bad,
)

# instdisc.datacheck imports it from here (the explicit alias marks it as re-exported)
from instdisc.sources.decode import _decode_members as _decode_members
from instdisc.sources.images import (
    ArrayImageSet,
    BadImageError,
    FileImageSet,
    ImageSet,
    decode_image,
    fit_image,
)
from instdisc.sources.layouts import (
    IMAGE_EXTENSIONS,
    _imagefolder,
    _is_pic_dir,
    _pic_files,
    _pic_root,
    _pic_selection,
    _Selection,
    _split_base,
)
from instdisc.sources.trees import _DirTree, _file_digest, _open_archive, _Tree

__all__ = [
    "ArrayImageSet",
    "BadImageError",
    "CIFAR_DOWNLOADS",
    "CifarDownload",
    "FileImageSet",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "align_classes",
    "canonical_spec",
    "class_ids",
    "decode_image",
    "default_cache_dir",
    "download_cifar",
    "fit_image",
    "open_eval_split",
    "open_source",
]


SPLITS = ("train", "test")


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
        raise DataError(
            "no data source given: pass a folder, an archive, or digits / synthetic[:N] / cifar10 / cifar100."
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    builtin = _parse_builtin(spec)
    if builtin is not None:
        return _open_builtin(builtin[0], builtin[1], split, cache, download, image_size, progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise _missing_path_error(spec, path)
    path = path.resolve()
    path = _pic_root(path) or path
    name = str(path)
    if path.is_dir():
        if _is_pic_dir(path):
            ztree, sel, map_path = _pic_selection(path, split)
            try:
                fp = hashlib.sha256(
                    (ztree.fingerprint([]) + _file_digest(map_path)).encode()
                ).hexdigest()
                return _materialise(
                    ztree,
                    sel,
                    name=name,
                    split=split,
                    cache=cache,
                    fp=fp,
                    image_size=image_size,
                    in_memory=in_memory,
                    progress=progress,
                )
            finally:
                ztree.close()
        tree: _Tree = _DirTree(path)
        digest = None
    elif path.is_file():
        digest = _file_digest(path)
        if in_memory is not False:  # a hit must not pay for listing the archive
            hit = _load_cached(
                cache,
                _cache_key(path.name, split, {"source": digest, "image_size": image_size}),
                name,
                split,
            )
            if hit is not None:
                return hit
        tree = _open_archive(path, digest, progress)
    else:
        raise DataError(f"{path} is neither a folder nor a file.")
    try:
        result = _open_tree_split(
            tree,
            split,
            name=name,
            cache=cache,
            image_size=image_size,
            in_memory=in_memory,
            progress=progress,
        )
        if tree.is_archive and isinstance(result, ArrayImageSet) and not result.meta.get("cached"):
            # Listing an archive is the slow part of a cold open (seconds for CIFAR-sized tars) and
            # the other split is nearly always opened next: decode it now, while it is listed.
            other = "test" if split == "train" else "train"
            try:
                _open_tree_split(
                    tree,
                    other,
                    name=name,
                    cache=cache,
                    image_size=image_size,
                    in_memory=in_memory,
                    progress=progress,
                )
            except DataError:
                pass  # absent or broken: reported when (if) that split itself is opened
        return result
    finally:
        tree.close()


def canonical_spec(spec: str) -> str:
    """A source spec as a run stores it: a built-in name as given, a path made absolute (symlinks
    resolved), so that the same data given by another path is recognised as the same."""
    if _parse_builtin(spec) is not None:
        return spec
    return str(Path(spec).expanduser().resolve())


def open_eval_split(
    spec: str,
    split: str = "test",
    *,
    classes: list[str] | None,
    drop_unknown: bool = False,
    **kw,
) -> ImageSet:
    """One split of a source for evaluation, its labels numbered by the training split's `classes`.

    ``classes`` None (an unlabelled training set) leaves the labels as they are. Other keywords are
    those of `open_source`.

    Raises:
        DataError: as `open_source`; or the split has a class the training split lacks (unless
            ``drop_unknown``, which leaves those images out and says how many).
    """
    images = open_source(spec, split, **kw)
    if classes is None:
        return images
    return align_classes(images, classes, drop_unknown=drop_unknown,
                         what=f"the {split} split of {images.name}")


def _open_tree_split(
    tree: _Tree,
    split: str,
    *,
    name: str,
    cache: Path,
    image_size: int | None,
    in_memory: bool | None,
    progress: bool,
) -> ImageSet:
    """One split of a listed folder or archive (CIFAR batches or an ImageFolder)."""
    cifar = _detect_cifar(tree)
    if cifar is not None:
        fmt, prefix = cifar
        names = [prefix + f for f in (*fmt.train, *fmt.test, fmt.meta)]
        key = _cache_key(
            tree.path.name, split, {"source": tree.fingerprint(names), "image_size": image_size}
        )
        return _cached_or_build(
            cache,
            key,
            name,
            split,
            image_size,
            lambda: (
                *_read_cifar(tree, fmt, prefix, split),
                {"format": f"{fmt.name}-python", "source": name},
            ),
        )
    sel = _imagefolder(tree, split)
    return _materialise(
        tree,
        sel,
        name=name,
        split=split,
        cache=cache,
        fp=tree.fingerprint(sel.names),
        image_size=image_size,
        in_memory=in_memory,
        progress=progress,
    )


def _materialise(
    tree: _Tree,
    sel: _Selection,
    *,
    name: str,
    split: str,
    cache: Path,
    fp: str,
    image_size: int | None,
    in_memory: bool | None,
    progress: bool,
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
        streamed = FileImageSet(
            tree.items(sel.names),
            sel.labels,
            sel.classes,
            name=name,
            split=split,
            image_size=image_size,
            meta=meta,
        )
        streamed.member_keys = [f"{n}\0{tree.files.get(n, -1)}" for n in sel.names]
        return streamed
    images, extra = _decode_to_array(
        tree, sel, image_size, progress=progress, desc=f"decode {Path(name).name} [{split}]", source=name
    )
    # "files": each row's member name in the source, so exported features can name their images.
    return _save_arrays(
        cache, key, images, sel.labels, sel.classes, name=name, split=split,
        meta={**meta, **extra, "files": list(sel.names)},
    )


def _open_builtin(
    kind: str,
    n: int | None,
    split: str,
    cache: Path,
    download: bool,
    image_size: int | None,
    progress: bool,
) -> ArrayImageSet:
    if kind == "digits":
        key = _cache_key("digits", split, {"version": DIGITS_VERSION, "image_size": image_size})
        return _cached_or_build(
            cache,
            key,
            "digits",
            split,
            image_size,
            lambda: (*_make_digits(split), {"format": "digits"}),
        )
    if kind == "synthetic":
        assert n is not None
        count = n if split == "train" else max(1, n // 4)
        name = "synthetic" if n == SYNTHETIC_DEFAULT_N else f"synthetic:{n}"
        key = _cache_key(
            "synthetic", split, {"version": SYNTHETIC_VERSION, "n": count, "image_size": image_size}
        )
        return _cached_or_build(
            cache,
            key,
            name,
            split,
            image_size,
            lambda: (*_make_synthetic(count, split), {"format": "synthetic"}),
        )
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
    return _cached_or_build(
        cache,
        key,
        kind,
        split,
        image_size,
        lambda: (*_read_cifar(tree, fmt, prefix, split), {"format": f"{kind}-python"}),
    )


# --------------------------------------------------------------------------------------------
# Package-internal entry points for instdisc.datacheck
# --------------------------------------------------------------------------------------------


@dataclass
class _SplitPlan:
    split: str
    tree: _Tree
    sel: _Selection


def _plan_file_source(
    spec: str, progress: bool = True
) -> tuple[str, list[_SplitPlan] | dict[str, int]]:
    """Resolve a folder/archive for checking -> (display name, per-split plans), or
    (name, {split: count}) for CIFAR python batches (which have nothing to decode)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise _missing_path_error(spec, path)
    path = path.resolve()
    path = _pic_root(path) or path  # as open_source reads it
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
    plans = [
        _SplitPlan(s, tree, _imagefolder(tree, s))
        for s in SPLITS
        if _split_base(tree, s) is not None
    ]
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

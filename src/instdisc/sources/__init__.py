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
``plans``
    `resolve(spec, split) -> Plan`: the one dispatch on a spec (its kind, listed tree, the
    split's selection, its cache key), from which opening, ``data check`` and ``data prepare``
    all decide.
``opening``
    `open_source`, which materialises a plan; `open_eval_split`, an evaluation split with the
    training split's label ids.
``pernode``
    Under torchrun, one process per node decodes and caches while the others wait (`once_per_node`).
this package
    This contract, and the public names re-exported.

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
*Small images* (``stream=False``, or, by default, when 16 images spread over the split -- the first
16 of a compressed tar -- are all <= 64 px on their longest side, judged from their headers alone
so that the decision is cheap even for ImageNet) are decoded once into ``CACHE/arrays/<key>.npy``
(uint8, N x H x W x 3) plus ``<key>.labels.npy`` and ``<key>.json`` (classes, meta; written last,
so its presence marks a complete entry), all written atomically (temporary file + ``os.replace``).
They come back as an `ArrayImageSet` whose ``images`` is a copy-on-write ``np.memmap`` of that
file, so the second open costs milliseconds. Decoding one split of an archive also decodes the
other one while the archive is listed (listing is the slow part; the other split is nearly always
opened next; ``prefetch_other=False`` opts out). The key hashes the source's content: the sha256 of
an archive's bytes (above 256 MiB: its size, mtime and the sha256 of its first and last 8 MiB, so
opening a 150 GB archive does not hash 150 GB), the relative paths, sizes and mtimes of a
directory's files, or a version string and the parameters of a built-in. Different image sizes in
this path are made uniform: to ``image_size`` when given, else to the most common size of the
source (ties: the larger), by the resize + centre crop of `fit_image`. An unreadable cache entry is
rebuilt; an unwritable cache directory gives a warning and an in-memory set.

*Large images* (``stream=True``, or, by default, all others) become a `FileImageSet`: every file is
listed up front (so indices are fixed) and empty, missing or link members are rejected at open, but
images are only decoded by ``read(i)`` (typically in DataLoader workers); ``instdisc data check``
decodes everything ahead of time. Unless ``image_size`` is given, training crops them at decode
time: ``read_crops(i, ...)`` resizes boxes drawn on the whole stored image (see `instdisc.loader`),
decoding JPEGs at the DCT scale the boxes allow; evaluation reads ``read_eval(i, size)``, the short
side resized to ``round(size * 256 / 224)`` and the centre ``size x size`` crop. ``read(i)``
(previews, reports, and every use when ``image_size`` is given) resizes the short side to
``image_size`` (default 256) with bilinear filtering and centre-crops a square. Large images inside
a *compressed* tar cannot be read at random; that case raises `DataError` suggesting to decompress
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

from instdisc.sources.cache import default_cache_dir
from instdisc.sources.cifar import CIFAR_DOWNLOADS, CifarDownload, download_cifar
from instdisc.sources.classes import align_classes, class_ids
from instdisc.sources.images import (
    ArrayImageSet,
    BadImageError,
    FileImageSet,
    ImageSet,
    decode_image,
    fit_image,
)
from instdisc.sources.layouts import IMAGE_EXTENSIONS
from instdisc.sources.opening import canonical_spec, materialise, open_eval_split, open_source
from instdisc.sources.plans import SPLITS, Plan, Source, resolve, resolve_all

__all__ = [
    "ArrayImageSet",
    "BadImageError",
    "CIFAR_DOWNLOADS",
    "CifarDownload",
    "FileImageSet",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "Plan",
    "SPLITS",
    "Source",
    "align_classes",
    "canonical_spec",
    "class_ids",
    "decode_image",
    "default_cache_dir",
    "download_cifar",
    "fit_image",
    "materialise",
    "open_eval_split",
    "open_source",
    "resolve",
    "resolve_all",
]

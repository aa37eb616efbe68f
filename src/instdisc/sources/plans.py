"""Resolving a source spec: the one place that decides what a split of a source is.

`resolve(spec, split)` returns a `Plan`: the source's kind, its listed tree, the split's
selection of members (or, for built-ins and CIFAR batches, how to build its arrays) and its
array-cache key. Everything that reads a source decides from a plan: `open_source` materialises
it (`instdisc.sources.opening`), ``instdisc data check`` decodes it (`instdisc.datacheck`) and
``instdisc data prepare`` copies it, so the three can never disagree about which files form a
split or which of them are bad.

A plan is lazy: nothing is listed or hashed before it is asked for. That is what lets a cache hit
on an archive skip listing the archive (its key hashes the archive's bytes, not its listing),
while a folder's key needs its listing (it hashes the files' sizes and mtimes). The plans of one
`Source` share one listing, so opening a split and then the other lists an archive once.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from instdisc.errors import DataError
from instdisc.sources.builtin import (
    DIGITS_VERSION,
    SYNTHETIC_DEFAULT_N,
    SYNTHETIC_VERSION,
    _make_digits,
    _make_synthetic,
    _parse_builtin,
)
from instdisc.sources.cache import _cache_key, default_cache_dir
from instdisc.sources.cifar import (
    _CIFAR_FORMATS,
    CIFAR_DOWNLOADS,
    _cifar_complete,
    _CifarFormat,
    _detect_cifar,
    _read_cifar,
    download_cifar,
)
from instdisc.sources.layouts import (
    _imagefolder,
    _is_pic_dir,
    _pic_files,
    _pic_root,
    _pic_selection,
    _Selection,
    _split_base,
)
from instdisc.sources.trees import _DirTree, _file_digest, _open_archive, _Tree

__all__ = ["SPLITS", "Plan", "Source", "resolve", "resolve_all"]

SPLITS = ("train", "test")

_GENERATED = ("digits", "synthetic")  # built-ins generated in memory: nothing to list
_CIFAR = ("cifar10", "cifar100")  # built-ins read from CACHE/<name>/


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'test', not {split!r}.")
    return split


def _missing_path_error(spec: str, path: Path) -> DataError:
    return DataError(
        f"data source {spec!r} not found: {path} does not exist. Give an existing folder or a "
        ".tar/.tar.gz/.tgz/.zip archive, or one of the built-in sources digits, synthetic[:N], "
        "cifar10, cifar100."
    )


class Source:
    """A source spec located once (a built-in, a folder, an archive or PIC's zips), before any
    split is chosen. Its trees are listed on first use and shared by the plans of its splits;
    `close` (or ``with``) releases them.

    ``kind``: ``digits``, ``synthetic``, ``cifar10``, ``cifar100``, ``folder``, ``archive`` or
    ``pic-zip``. ``checking``: for ``instdisc data check``, which never downloads (a missing
    built-in CIFAR is explained for that command).
    """

    def __init__(
        self,
        spec: str,
        *,
        cache_dir: str | Path | None = None,
        download: bool = False,
        progress: bool = True,
        checking: bool = False,
    ) -> None:
        if not isinstance(spec, str) or not spec.strip():
            raise DataError(
                "no data source given: pass a folder, an archive, or digits / synthetic[:N] / cifar10 / cifar100."
            )
        self.cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.progress = progress
        self._trees: dict[Path, _Tree] = {}
        builtin = _parse_builtin(spec)
        self.n: int | None = None
        if builtin is not None:
            self.kind, self.n = builtin
            self.path: Path | None = self.cache / self.kind if self.kind in _CIFAR else None
            self.name = (
                f"synthetic:{self.n}" if self.kind == "synthetic" and self.n != SYNTHETIC_DEFAULT_N else self.kind
            )
            if self.kind in _CIFAR:
                self._ensure_cifar(download, checking)
            return
        path = Path(spec).expanduser()
        if not path.exists():
            raise _missing_path_error(spec, path)
        path = path.resolve()
        path = _pic_root(path) or path  # naming train.zip next to its map means PIC's layout
        if path.is_dir():
            self.kind = "pic-zip" if _is_pic_dir(path) else "folder"
        elif path.is_file():
            self.kind = "archive"
        else:
            raise DataError(f"{path} is neither a folder nor a file.")
        self.path, self.name = path, str(path)

    def _ensure_cifar(self, download: bool, checking: bool) -> None:
        fmt, root = _CIFAR_FORMATS[self.kind], self.path
        assert root is not None
        if _cifar_complete(root / fmt.folder, fmt) or _cifar_complete(root, fmt):
            return
        url = CIFAR_DOWNLOADS[self.kind].url
        if checking:
            raise DataError(
                f"{self.kind} is not in {root}. Fetch it with `instdisc train --data {self.kind} --download` "
                f"(or download {url} by hand), or check a folder path instead."
            )
        if not download:
            raise DataError(
                f"{self.kind} is not in {root}. Pass --download (download=True) to fetch the official "
                f"archive ({url}), or give the path of a folder holding "
                f"{fmt.folder}/ (or an image folder / archive) as the data source."
            )
        download_cifar(self.kind, root, progress=self.progress)

    # -- listings, each made at most once -----------------------------------------------------

    def tree(self) -> _Tree:
        """The listed folder, archive or CIFAR cache folder (not for PIC: a zip per split)."""
        assert self.path is not None and self.kind != "pic-zip"
        if self.path not in self._trees:
            if self.kind == "archive":
                self._trees[self.path] = _open_archive(self.path, None, self.progress)
            else:
                self._trees[self.path] = _DirTree(self.path)
        return self._trees[self.path]

    @cached_property
    def digest(self) -> str:
        """An archive's content digest: its cache key, known without listing it."""
        assert self.kind == "archive" and self.path is not None
        return _file_digest(self.path)

    @cached_property
    def cifar(self) -> tuple[_CifarFormat, str] | None:
        """The CIFAR python batches (format, member prefix) the source holds, if it holds them."""
        if self.kind in _GENERATED or self.kind == "pic-zip":
            return None
        detected = _detect_cifar(self.tree())
        if detected is None and self.kind in _CIFAR:  # pragma: no cover - guarded by _cifar_complete
            raise DataError(f"{self.path} does not hold {self.kind} python batches.")
        return detected

    def pic(self, split: str) -> tuple[_Tree, _Selection, Path]:
        """PIC's zip, selection and map file for ``split`` (raises when the split is absent)."""
        assert self.path is not None
        ztree, sel, map_path = _pic_selection(self.path, split)
        old = self._trees.pop(ztree.path, None)
        if old is not None:
            old.close()
        self._trees[ztree.path] = ztree
        return ztree, sel, map_path

    # -- splits --------------------------------------------------------------------------------

    def plan(self, split: str, image_size: int | None = None) -> Plan:
        return Plan(self, check_split(split), image_size)

    def splits(self) -> list[str]:
        """The splits this source has (``instdisc data check`` checks all of them)."""
        if self.kind in _GENERATED or self.kind in _CIFAR:
            return list(SPLITS)
        assert self.path is not None
        if self.kind == "pic-zip":
            return [s for s in SPLITS if s == "train" or _pic_files(self.path, s) is not None]
        if self.cifar is not None:
            return list(SPLITS)
        found = [s for s in SPLITS if _split_base(self.tree(), s) is not None]
        if not found:
            _imagefolder(self.tree(), "train")  # raises the precise error
        return found

    def close(self) -> None:
        for t in self._trees.values():
            t.close()
        self._trees.clear()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Plan:
    """One split of a `Source`, resolved: everything needed to open it or to check it.

    Attributes (each computed on first use):
        tree: the listed tree its members come from (None for digits / synthetic).
        arrays_built: True for built-ins and CIFAR batches, whose whole split is built as arrays
            (`build`); False for image files (`sel`), which are decoded or streamed.
        sel: the split's members in dataset-index order (image files only).
        key: the split's array-cache key (content of the source + ``image_size``).
    """

    def __init__(self, source: Source, split: str, image_size: int | None) -> None:
        self.source, self.split, self.image_size = source, split, image_size

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def kind(self) -> str:
        return self.source.kind

    @property
    def cache(self) -> Path:
        return self.source.cache

    @cached_property
    def _pic(self) -> tuple[_Tree, _Selection, Path]:
        return self.source.pic(self.split)

    @cached_property
    def tree(self) -> _Tree | None:
        if self.kind in _GENERATED:
            return None
        return self._pic[0] if self.kind == "pic-zip" else self.source.tree()

    @property
    def arrays_built(self) -> bool:
        return self.kind in _GENERATED or self.kind in _CIFAR or self.source.cifar is not None

    @cached_property
    def sel(self) -> _Selection:
        if self.kind == "pic-zip":
            return self._pic[1]
        assert not self.arrays_built and self.tree is not None
        return _imagefolder(self.tree, self.split)

    def _count_generated(self) -> int:
        if self.kind == "digits":
            return 1437 if self.split == "train" else 360
        assert self.source.n is not None
        return self.source.n if self.split == "train" else max(1, self.source.n // 4)

    def _cifar_names(self) -> list[str]:
        assert self.source.cifar is not None
        fmt, prefix = self.source.cifar
        return [prefix + f for f in (*fmt.train, *fmt.test, fmt.meta)]

    @cached_property
    def key(self) -> str:
        def key(slug: str, source: dict[str, Any]) -> str:
            return _cache_key(slug, self.split, {**source, "image_size": self.image_size})

        if self.kind == "digits":
            return key("digits", {"version": DIGITS_VERSION})
        if self.kind == "synthetic":
            return key("synthetic", {"version": SYNTHETIC_VERSION, "n": self._count_generated()})
        assert self.source.path is not None
        if self.kind in _CIFAR:
            return key(self.kind, {"source": self.source.tree().fingerprint(self._cifar_names())})
        if self.kind == "archive":  # whatever it holds, an archive's bytes fingerprint it
            return key(self.source.path.name, {"source": self.source.digest})
        if self.kind == "pic-zip":
            ztree, _, map_path = self._pic
            digest = hashlib.sha256((ztree.fingerprint([]) + _file_digest(map_path)).encode()).hexdigest()
            return key(ztree.path.name, {"source": digest})
        tree = self.source.tree()
        names = self._cifar_names() if self.source.cifar is not None else self.sel.names
        return key(tree.path.name, {"source": tree.fingerprint(names)})

    def build(self) -> tuple[np.ndarray, np.ndarray | None, list[str], dict[str, Any]]:
        """(images, labels, classes, meta) of a built-in or CIFAR split (``arrays_built``)."""
        if self.kind == "digits":
            return (*_make_digits(self.split), {"format": "digits"})
        if self.kind == "synthetic":
            return (*_make_synthetic(self._count_generated(), self.split), {"format": "synthetic"})
        assert self.source.cifar is not None
        fmt, prefix = self.source.cifar
        images, labels, classes = _read_cifar(self.source.tree(), fmt, prefix, self.split)
        if self.kind in _CIFAR:
            return images, labels, classes, {"format": f"{self.kind}-python"}
        return images, labels, classes, {"format": f"{fmt.name}-python", "source": self.name}

    def count(self) -> int:
        """Images in a built-in or CIFAR split (CIFAR batches are parsed, hence validated)."""
        if self.kind in _GENERATED:
            return self._count_generated()
        assert self.source.cifar is not None
        fmt, prefix = self.source.cifar
        return len(_read_cifar(self.source.tree(), fmt, prefix, self.split)[1])

    def other(self) -> Plan:
        """The other split of the same source, sharing its listing."""
        return self.source.plan("test" if self.split == "train" else "train", self.image_size)

    def close(self) -> None:
        """Release the source's listings (open zip / tar handles)."""
        self.source.close()


def resolve(
    spec: str,
    split: str = "train",
    *,
    cache_dir: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    progress: bool = True,
) -> Plan:
    """The plan of one split of ``spec`` (see the `instdisc.sources` docstring for every form).
    Close it (`Plan.close`) when done: it may hold an open archive."""
    check_split(split)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive integer, not {image_size!r}.")
    return Source(spec, cache_dir=cache_dir, download=download, progress=progress).plan(split, image_size)


def resolve_all(spec: str, *, cache_dir: str | Path | None = None, progress: bool = True) -> list[Plan]:
    """The plans of every split ``spec`` has, sharing one listing (``data check``, ``data
    prepare``); never downloads. Close one of them to release the listing."""
    source = Source(spec, cache_dir=cache_dir, progress=progress, checking=True)
    try:
        return [source.plan(s) for s in source.splits()]
    except BaseException:
        source.close()
        raise

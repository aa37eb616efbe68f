"""Layouts: which members of a tree make up a split, in which order, with which labels.

The order decided here is the dataset index (the instance label of NPID, PIC and SeLa), so it
depends on names alone: an ImageFolder's classes and files are sorted, and PIC's zipped layout
(``train.zip`` + ``train_map.txt``) follows its map line by line. The class ids a split gets here
are its own; an evaluation split is renumbered onto its training split's classes by
`instdisc.sources.classes.align_classes`. The result is a `_Selection`;
nothing is decoded here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instdisc.errors import DataError
from instdisc.sources.classes import number_classes
from instdisc.sources.trees import _norm_member, _Tree, _ZipTree

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".ppm",
    ".gif",
    ".tif",
    ".tiff",
)
"""File extensions (compared case-insensitively) that count as images in folders and archives."""

_MAX_LISTED = 20  # bad files named in an error message

_SPLIT_DIRS = ("train", "test", "val")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(name: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in name.split("/"))


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
            subdirs.add(d[len(base) :].split("/", 1)[0])
    for f in files:
        if f.startswith(base):
            rest = f[len(base) :]
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
    if not any("/" in f[len(top) + 1 :] for f in files):
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
        rest = f[len(base) :]
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
    classes, ids = number_classes(class_dirs)
    empty = [tree.display(base + c) for c in classes if not groups.get(c)]
    if empty:
        raise DataError(
            f"{len(empty)} class folder(s) of {root} contain no images: {', '.join(empty[:_MAX_LISTED])}"
            f"{' ...' if len(empty) > _MAX_LISTED else ''}. Add images (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}) or delete the empty folders."
        )
    names: list[str] = []
    labels: list[int] = []
    for c in classes:
        members = sorted(groups[c])
        names.extend(members)
        labels.extend([ids[c]] * len(members))
    return _Selection(names, np.asarray(labels, dtype=np.int64), classes, "imagefolder", root)


# -- PIC zipped layout -----------------------------------------------------------------------

_PIC_FILES = {
    "train": [("train.zip", "train_map.txt")],
    "test": [("val.zip", "val_map.txt"), ("test.zip", "test_map.txt")],
}


def _pic_root(path: Path) -> Path | None:
    """PIC's folder when `path` is one of its zips (train.zip next to train_map.txt, ...): such a
    zip is read through its map, whichever of the two the user names, never as a bare archive
    (whose folder order is not the map's index order)."""
    for pairs in _PIC_FILES.values():
        for z, m in pairs:
            if path.name == z and path.is_file() and (path.parent / m).is_file() and _is_pic_dir(path.parent):
                return path.parent
    return None


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
        raise DataError(
            f"cannot read {map_path} ({e}). It must be UTF-8 text: relative/path<TAB>label per line."
        ) from None
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
    if (
        paths[0] not in tree.files
        and len(tops) == 1
        and (next(iter(tops)) + "/" + paths[0]) in tree.files
    ):
        prefix = next(iter(tops)) + "/"
    names = [prefix + p for p in paths]
    missing = [n for n in names if n not in tree.files]
    # class names come from the train map, so that both splits name (and count) classes alike
    tr_paths, tr_labels = (
        (paths, labels) if split == "train" else _read_pic_map(path / "train_map.txt")
    )
    num = max(max(labels), max(tr_labels)) + 1
    classes = _pic_classes(tr_paths, tr_labels, num)
    sel = _Selection(
        names, np.asarray(labels, dtype=np.int64), classes, "pic-zip", str(zpath), missing
    )
    return tree, sel, mpath

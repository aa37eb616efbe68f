"""CIFAR-10 and CIFAR-100 in the official python-pickle batch format: detection inside a tree,
reading with a restricted unpickler, and the download (md5 verified before anything is
extracted).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import posixpath
import shutil
import tarfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from instdisc.errors import DataError
from instdisc.progress import Progress
from instdisc.sources.trees import _ARCHIVE_ERRORS, _Tree

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
        "cifar10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": _CifarFormat(
        "cifar100",
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        "fine_labels",
        "fine_label_names",
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
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core"):  # numpy >= 2 renamed numpy.core; avoid its warning
            try:
                return getattr(
                    importlib.import_module("numpy._core" + module[len("numpy.core") :]), name
                )
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
        raise DataError(
            f"{where} is not a CIFAR python batch (it holds a {type(obj).__name__}, not a dict)."
        )
    # Python-2 pickles have bytes keys; re-pickled ones may have str keys.
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_cifar(
    tree: _Tree, fmt: _CifarFormat, prefix: str, split: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images ``(N, 32, 32, 3)``, labels and class names of one CIFAR split."""
    wanted = [prefix + f for f in (fmt.train if split == "train" else fmt.test)] + [
        prefix + fmt.meta
    ]
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
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": CifarDownload(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
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
                    raw.startswith("/")
                    or "\\" in raw
                    or ".." in parts
                    or ":" in parts[0]
                    or parts[0] != top
                    or not (m.isreg() or m.isdir())
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
        raise DataError(
            f"cannot extract {tar_path.name} ({type(e).__name__}: {e}); the download is damaged."
        ) from None

"""What a training set is, independently of where it lies: a fingerprint per image, so that
``--resume`` can tell "the same data, maybe by another path" from "other images".

A decoded (small-image) set is fingerprinted by its pixels: the CRC-32 of each stored image, so an
edited, replaced or reordered image is caught whatever its file is called or when it was copied.
A streamed set is not read in full at every resume (that would mean reading an ImageNet); each of
its images is identified by its path relative to the source's root and its size in bytes. Labels
and class names are kept too. `difference` explains what changed, naming the first images.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from instdisc.sources.images import ArrayImageSet, FileImageSet, ImageSet

_SHOWN = 3  # changed images named in a message


def _digests(images: ImageSet) -> tuple[np.ndarray, str]:
    """(N,) int64 CRC-32 per image and what they hash ("pixels" or "files")."""
    n = len(images)
    out = np.empty(n, dtype=np.int64)
    if isinstance(images, ArrayImageSet):
        arr = images.images
        for i in range(n):
            out[i] = zlib.crc32(np.ascontiguousarray(arr[i]).data)
        return out, "pixels"
    if isinstance(images, FileImageSet):
        keys = images.member_keys
        for i in range(n):
            key = keys[i] if keys is not None else images.path(i)
            out[i] = zlib.crc32(key.encode("utf-8", "surrogateescape"))
        return out, "files"
    for i in range(n):  # any other ImageSet: decode everything (small custom sets)
        out[i] = zlib.crc32(np.ascontiguousarray(images.read(i)).data)
    return out, "pixels"


def data_fingerprint(images: ImageSet) -> dict[str, Any]:
    """What `difference` compares, as plain tensors and lists (a checkpoint's ``data`` entry)."""
    digests, how = _digests(images)
    return {
        "n": len(images),
        "how": how,
        # CRC-32 is unsigned 32-bit: shifted into int32 to halve the size of the checkpoint entry
        "images": torch.from_numpy((digests - 2**31).astype(np.int32)),
        "labels": None if images.labels is None else torch.from_numpy(images.labels.astype(np.int32)),
        "classes": list(images.classes),
    }


def _where(images: ImageSet, i: int) -> str:
    return f"image {i} ({images.path(i)})" if isinstance(images, FileImageSet) else f"image {i}"


def difference(saved: dict[str, Any], now: dict[str, Any], images: ImageSet) -> str | None:
    """Why `images` (whose `data_fingerprint` is `now`) is not the set `saved` was taken of, in
    words; None when it is the same."""
    n = len(images)
    if int(saved["n"]) != n:
        return f"it has {n} images now, the run trained on {int(saved['n'])}"
    if saved.get("how") == now["how"]:
        changed = np.flatnonzero(saved["images"].numpy() != now["images"].numpy())
        if len(changed):
            what = "pixels" if now["how"] == "pixels" else "file names or sizes"
            first = ", ".join(_where(images, int(i)) for i in changed[:_SHOWN])
            return (f"{len(changed)} of its {n} images differ from those the run trained on (their {what}; "
                    f"first: {first})")
    if list(saved.get("classes") or []) != now["classes"]:
        return f"its classes are {now['classes'][:10]} now, the run trained on {list(saved['classes'])[:10]}"
    old, new = saved.get("labels"), now["labels"]
    if (old is None) != (new is None):
        return "it is labelled now and was not then" if old is None else "it has lost its labels"
    if old is not None:
        moved = np.flatnonzero(old.numpy() != new.numpy())
        if len(moved):
            first = ", ".join(_where(images, int(i)) for i in moved[:_SHOWN])
            return f"{len(moved)} of its images have another label than when the run trained (first: {first})"
    return None

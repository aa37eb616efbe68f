"""Decoding whole splits, judged the same way by `open_source` and ``instdisc data check``.

A file that does not decode is never skipped (that would shift the index of every later image):
`_decode_to_array` collects every bad file and raises one `DataError` naming them.
`_probe_small` decides from a few image headers whether a split goes to the array cache (small
images) or is streamed as a `FileImageSet`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from instdisc.errors import DataError
from instdisc.progress import Progress
from instdisc.sources.images import BadImageError, _probe_size, decode_image, fit_image
from instdisc.sources.layouts import _MAX_LISTED, _Selection
from instdisc.sources.trees import _Tree

SMALL_IMAGE_MAX_SIDE = 64
"""Sources whose probed images are all at most this long on their longest side go to the array cache."""

_PROBE_COUNT = 16  # images whose header decides "small" vs "large"
_PROGRESS_MIN_ITEMS = 2000  # smaller jobs finish before a progress line would help


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
# Decoding many members
# --------------------------------------------------------------------------------------------


def _decode_members(
    tree: _Tree,
    sel: _Selection,
    *,
    progress: bool,
    desc: str,
) -> Iterator[tuple[str, Image.Image | None, str | None, str | None]]:
    """Decode every member of a split fully -> (name, rgb image | None, original mode | None, bad
    reason | None), each distinct member once.

    The one judgement of a split's files: `open_source` (through `_decode_to_array`) and
    `instdisc.datacheck.check_source` both iterate this over the same `_Selection`, so a file the
    loader refuses (unreadable, a pipe, missing from a PIC zip) is one the check reports.
    Yields in the tree's efficient read order, not necessarily in ``sel.names`` order.
    """
    names = list(dict.fromkeys(sel.names))
    missing = set(sel.missing or ())
    problems = {**tree.problems, **{n: "missing from the archive" for n in missing}}
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
    tree: _Tree,
    sel: _Selection,
    image_size: int | None,
    *,
    progress: bool,
    desc: str,
    source: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a whole split into one ``(N, H, W, 3)`` array (raising DataError on any bad file).
    `source` is what the user gave (PIC's folder rather than its zip), for the message."""
    unique = list(dict.fromkeys(sel.names))
    decoded: dict[str, np.ndarray] = {}
    bad: list[tuple[str, str]] = []
    for n, img, _mode, reason in _decode_members(tree, sel, progress=progress, desc=desc):
        if img is None:
            bad.append((tree.display(n), reason or "unreadable"))
        else:
            decoded[n] = np.asarray(img)
    if bad:
        rank = {tree.display(n): i for i, n in enumerate(unique)}
        bad.sort(key=lambda b: rank.get(b[0], -1))  # report in dataset order
        raise _bad_files_error(source or str(tree.path), bad, len(unique))
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
    sizes = [
        s
        for _, data, _ in tree.read_many(sample)
        if data is not None
        for s in [_probe_size(data)]
        if s
    ]
    return all(max(s) <= SMALL_IMAGE_MAX_SIDE for s in sizes)

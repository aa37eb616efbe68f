"""Class names and label ids: where they are numbered, and how an evaluation split is mapped onto them.

One rule for the whole project: **the training split's class names define the label ids**. A
layout numbers the classes of the split it reads (`number_classes`: an ImageFolder's sorted folder
names); every evaluation split (a source's test split, ``--test-data``, another source given to
``embed``/``knn``/...) is then mapped *by name* onto the training split's list (`align_classes`).
Numbering each split from its own folders would silently give a test split that lacks one class
(or has one more) other ids for the same names, and kNN would score 0% where 100% is right.

A test split may lack some training classes (ids still come from the training list). A class the
training split does not have is an error naming it, unless the caller drops those images
(``--drop-unknown-classes``), which is then said with the count.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from instdisc.errors import DataError

_MAX_NAMED = 10  # classes named in a message


def number_classes(names: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Class names of one split (any order, repeats allowed) -> (sorted classes, name -> id)."""
    classes = sorted(set(names))
    return classes, {c: k for k, c in enumerate(classes)}


def _named(names: Sequence[str]) -> str:
    shown = ", ".join(repr(c) for c in names[:_MAX_NAMED])
    return shown + (f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else "")


def class_ids(
    classes: Sequence[str],
    onto: Sequence[str],
    *,
    what: str,
    drop_unknown: bool = False,
) -> np.ndarray:
    """Id of each of `classes` in `onto`, -1 for a class `onto` lacks (only with drop_unknown).

    Raises:
        DataError: `classes` has a name `onto` lacks and drop_unknown is False; `onto` has repeats.
    """
    if len(set(onto)) != len(onto):
        raise DataError(f"the training classes of {what} repeat a name; class names must be unique.")
    index = {c: k for k, c in enumerate(onto)}
    unknown = [c for c in classes if c not in index]
    if unknown and not drop_unknown:
        raise DataError(
            f"{what} has {len(unknown)} class(es) that the training split does not have: {_named(unknown)} "
            f"(training classes: {_named(list(onto))}). Label ids come from the training split's class "
            "names, so these images have no label. Remove them, or pass --drop-unknown-classes to leave "
            "them out of the evaluation."
        )
    return np.asarray([index.get(c, -1) for c in classes], dtype=np.int64)


def align_classes(images, onto: Sequence[str], *, drop_unknown: bool = False, what: str | None = None):  # noqa: ANN001, ANN201
    """`images` (an `ImageSet`) with its labels renumbered onto the class list `onto`, by name.

    An unlabelled set, or one whose classes already are `onto`, is returned as it is. With
    drop_unknown, images of classes `onto` lacks are left out (a note on stderr gives the count).

    Raises:
        DataError: a class `onto` lacks (without drop_unknown), or every image dropped.
    """
    from instdisc.sources.images import subset

    if images.labels is None or list(images.classes) == list(onto):
        return images
    what = what or f"the {images.split} split of {images.name}"
    ids = class_ids(images.classes, onto, what=what, drop_unknown=drop_unknown)
    labels = ids[images.labels]  # (N,) new ids, -1 = class unknown to the training split
    keep = np.flatnonzero(labels >= 0)
    if len(keep) < len(labels):
        gone = [c for c, k in zip(images.classes, ids, strict=True) if k < 0]
        if not len(keep):
            raise DataError(
                f"--drop-unknown-classes left no image of {what}: none of its classes ({_named(gone)}) "
                f"is a training class ({_named(list(onto))})."
            )
        print(
            f"instdisc: note: --drop-unknown-classes: left out {len(labels) - len(keep)} of {len(labels)} "
            f"images of {what} (classes the training split does not have: {_named(gone)}).",
            file=sys.stderr,
        )
    return subset(images, keep, labels[keep], onto)

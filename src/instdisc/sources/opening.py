"""Opening a source: `open_source` materialises the `Plan` of a split as an `ImageSet`.

One cache lookup, whatever the source: the plan's key, computed before anything is listed when
the source allows it (an archive), so a hit costs milliseconds.
"""

from __future__ import annotations

from pathlib import Path

from instdisc.errors import DataError
from instdisc.sources.builtin import _parse_builtin
from instdisc.sources.cache import _load_cached, _resize_all, _save_arrays
from instdisc.sources.classes import align_classes
from instdisc.sources.decode import (
    _bad_files_error,
    _decode_to_array,
    _probe_small,
    _structural_bad,
)
from instdisc.sources.images import ArrayImageSet, FileImageSet, ImageSet
from instdisc.sources.plans import Plan, resolve

__all__ = ["canonical_spec", "materialise", "open_eval_split", "open_source"]


def open_source(
    spec: str,
    split: str = "train",
    *,
    cache_dir: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    stream: bool | None = None,
    prefetch_other: bool = True,
    progress: bool = True,
    in_memory: bool | None = None,
) -> ImageSet:
    """Open one split of a data source (see the `instdisc.sources` docstring for every form of ``spec``).

    Args:
        spec: ``digits``, ``synthetic[:N]``, ``cifar10``, ``cifar100``, a folder or an archive.
        split: ``"train"`` or ``"test"``.
        cache_dir: where decoded arrays and downloads go (default `default_cache_dir`).
        download: fetch ``cifar10``/``cifar100`` from the official URL when absent.
        image_size: make every image ``image_size x image_size`` (short-side resize + centre
            crop). Default: small sources keep their size, streamed ones use 256.
        stream: ``True`` streams folders/archives as a `FileImageSet`; ``False`` decodes
            everything into the array cache whatever the image size; ``None`` decides by size.
            (Not training's ``--in-memory``, which holds a set on the training device.)
        prefetch_other: when a split of an archive is decoded (not a cache hit), decode its other
            split too while the archive is listed: listing is the slow part of a cold open, and
            the other split is nearly always opened next. Errors there are left for the open of
            that split itself.
        progress: print progress lines on stderr while decoding or downloading big sources.
        in_memory: the old name of ``stream``, in the opposite sense (``in_memory=False`` is
            ``stream=True``); kept as an alias.

    Returns:
        An `ArrayImageSet` (small images) or a `FileImageSet` (large images).

    Raises:
        DataError: missing, empty, malformed or partly unreadable source; bad ``split``.
    """
    if in_memory is not None:
        if stream is not None and stream == in_memory:
            raise DataError(f"stream={stream} contradicts in_memory={in_memory} (its old name, in the opposite "
                            "sense); give only stream.")
        stream = not in_memory
    plan = resolve(spec, split, cache_dir=cache_dir, download=download, image_size=image_size, progress=progress)
    try:
        result = materialise(plan, stream=stream, progress=progress)
        if prefetch_other and plan.kind == "archive" and isinstance(result, ArrayImageSet) \
                and not result.meta.get("cached"):
            try:
                materialise(plan.other(), stream=stream, progress=progress)
            except DataError:
                pass  # absent or broken: reported when (if) that split itself is opened
        return result
    finally:
        plan.close()


def materialise(plan: Plan, *, stream: bool | None = None, progress: bool = True) -> ImageSet:
    """The `ImageSet` of a plan: the cached arrays when there are any, else built-in / CIFAR arrays
    built and cached, image files decoded and cached (small images) or a `FileImageSet`."""
    if stream is not True or plan.arrays_built:  # a stream asked for is never a cached array
        hit = _load_cached(plan.cache, plan.key, plan.name, plan.split)
        if hit is not None:
            return hit
    if plan.arrays_built:
        images, labels, classes, meta = plan.build()
        return _save_arrays(plan.cache, plan.key, _resize_all(images, plan.image_size), labels, classes,
                            name=plan.name, split=plan.split, meta=meta)
    tree, sel, name = plan.tree, plan.sel, plan.name
    assert tree is not None
    small = not stream if stream is not None else _probe_small(tree, sel.names)
    meta = {"format": sel.fmt, "source": name}
    if not small:
        # Streaming decodes nothing now, but what is visibly broken (empty, missing, link
        # members) is refused now rather than an hour into training.
        bad = _structural_bad(tree, sel)
        if bad:
            raise _bad_files_error(name, bad, len(sel.names))
        streamed = FileImageSet(tree.items(sel.names), sel.labels, sel.classes, name=name, split=plan.split,
                                image_size=plan.image_size, meta=meta)
        streamed.member_keys = [f"{n}\0{tree.files.get(n, -1)}" for n in sel.names]
        return streamed
    images, extra = _decode_to_array(tree, sel, plan.image_size, progress=progress,
                                     desc=f"decode {Path(name).name} [{plan.split}]", source=name)
    # "files": each row's member name in the source, so exported features can name their images.
    return _save_arrays(plan.cache, plan.key, images, sel.labels, sel.classes, name=name, split=plan.split,
                        meta={**meta, **extra, "files": list(sel.names)})


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


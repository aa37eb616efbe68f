"""``instdisc data prepare SRC DST --max-side N``: a smaller copy of a large-image source.

Decoding dominates the cost of feeding a GPU from ImageNet-sized JPEGs (docs/benchmarks.md); a
copy whose images are at most N px on their longer side decodes several times faster. The copy
keeps what makes it the *same* data set:

* every image keeps its relative path and file name, so the sorted listing, hence every dataset
  index and label, is unchanged (checked after writing: the copy is listed again and compared);
* aspect ratios are kept (the longer side becomes N, the other ``round(side * N / longer)``);
* images already within N px are copied byte for byte; larger ones are decoded as a training
  run reads them (`instdisc.sources.decode_image`: RGB, first frame, no EXIF rotation), resized
  with an antialiased filter and written in their own format (JPEG at ``--quality``).

Only ImageFolder sources (a folder, or a .tar / .zip of one) are prepared; a file that does not
decode stops the job with the same report as ``instdisc data check``. A marker file
``DST/.instdisc-prepared.json`` (source, max side, counts), written last, says the copy is
complete (hidden files are not part of any listing); an interrupted copy lacks it: delete DST and
run the command again. DST must be new (or empty) and outside SRC.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from instdisc.checkpoint import atomic_write_text
from instdisc.errors import DataError, UserError
from instdisc.progress import Progress
from instdisc.sources import decode_image
from instdisc.sources.builtin import _parse_builtin
from instdisc.sources.decode import _bad_files_error
from instdisc.sources.images import _probe_size
from instdisc.sources.layouts import _imagefolder_prefix, _visible
from instdisc.sources.plans import resolve_all

MARKER = ".instdisc-prepared.json"
_CHUNK = 64  # images per job sent to a worker process


@dataclass
class PrepareReport:
    """What ``prepare`` wrote: images per split, how many were resized, bytes before and after."""

    dst: Path
    counts: dict[str, int]
    resized: int
    bytes_in: int
    bytes_out: int

    def format(self) -> str:
        total = sum(self.counts.values())
        splits = ", ".join(f"{s} {n}" for s, n in self.counts.items())
        return (
            f"prepared {total} images ({splits}) in {self.dst}: {self.resized} resized, the rest copied; "
            f"{self.bytes_in / 2**20:.1f} MiB -> {self.bytes_out / 2**20:.1f} MiB. Indices and labels are those "
            "of the source."
        )


def fit_within(w: int, h: int, max_side: int) -> tuple[int, int]:
    """``(w, h)`` scaled so the longer side is ``max_side`` (unchanged when already within)."""
    longer = max(w, h)
    if longer <= max_side:
        return w, h
    s = max_side / longer
    return max(1, round(w * s)), max(1, round(h * s))


def shrink(data: bytes, max_side: int, quality: int) -> tuple[bytes, bool]:
    """One image's bytes in the copy, and whether it was resized (else they are ``data`` itself).

    Raises:
        BadImageError: the bytes do not decode.
    """
    wh = _probe_size(data)
    if wh is not None and max(wh) <= max_side:
        return data, False
    img, _ = decode_image(data, draft=fit_within(*wh, max_side) if wh else None)  # JPEG: DCT-scaled
    fmt = Image.open(io.BytesIO(data)).format or "PNG"  # it decoded, so it opens
    nw, nh = fit_within(*(wh or img.size), max_side)
    if (nw, nh) == img.size:
        return data, False
    # LANCZOS: the copy is made once and read for every epoch, so the better filter is worth it.
    small = img.resize((nw, nh), Image.LANCZOS)
    buf = io.BytesIO()
    if fmt == "JPEG":
        small.save(buf, format="JPEG", quality=quality)
    else:
        small.save(buf, format=fmt)
    return buf.getvalue(), True


def _work(job: list[tuple[str, bytes]], dst: str, max_side: int, quality: int) -> list[tuple[str, int, bool, str | None]]:
    """Write one chunk of images -> (relative path, bytes written, resized, bad reason | None)."""
    from instdisc.sources import BadImageError

    out = []
    for rel, data in job:
        try:
            new, resized = shrink(data, max_side, quality)
        except BadImageError as e:
            out.append((rel, 0, False, e.reason))
            continue
        path = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(new)
        out.append((rel, len(new), resized, None))
    return out


def prepare(
    src: str, dst: str | Path, *, max_side: int, quality: int = 90, workers: int = 0, progress: bool = True
) -> PrepareReport:
    """Write the copy of ``src`` into the new folder ``dst`` (see the module docstring).

    Args:
        src: an ImageFolder folder or archive (anything ``--data`` takes, built-ins aside).
        dst: a folder that does not exist yet, or an empty one.
        max_side: longest side of the images in the copy, in pixels.
        quality: JPEG quality of the resized JPEGs.
        workers: processes decoding and encoding (0: this process).
        progress: progress lines on stderr.

    Raises:
        DataError: unreadable or unsupported source, or files that do not decode.
        UserError: bad option, or ``dst`` is not new.
    """
    if max_side < 1:
        raise UserError(f"--max-side must be a positive number of pixels, not {max_side}.")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be between 1 and 100, not {quality}.")
    if _parse_builtin(src) is not None:
        raise UserError(f"{src!r} is a built-in source: it is small and needs no preparing.")
    out = Path(dst).expanduser()
    src_path = Path(src).expanduser().resolve()
    if src_path.is_dir() and out.resolve().is_relative_to(src_path):
        raise UserError(f"DST {str(out)!r} is inside SRC {str(src_path)!r}: the copy would become part of the "
                        "source it copies. Give a folder outside it.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{str(out)!r} already exists and is not an empty folder; give a new DST folder.")
    plans = resolve_all(src, progress=progress)
    name = plans[0].name
    if plans[0].arrays_built or plans[0].kind == "pic-zip" or any(p.sel.fmt != plans[0].sel.fmt for p in plans) \
            or not plans[0].sel.fmt.startswith("imagefolder"):
        plans[0].close()
        raise DataError(
            f"{name} is not an ImageFolder (folder, .tar or .zip of train/<class>/ images): `instdisc data "
            "prepare` copies only that layout, so that the copy lists in the same order. CIFAR batches are "
            "small already; a PIC zip + map layout can be extracted into an ImageFolder first."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        plans[0].close()
        raise UserError(f"cannot create {str(out)!r}: {e.strerror or e}.") from None
    tree = plans[0].tree
    assert tree is not None
    files, dirs = _visible(tree)
    prefix = _imagefolder_prefix(tree, files, dirs)  # an archive's top-level folder is not copied
    counts: dict[str, int] = {}
    resized = bytes_in = bytes_out = 0
    bad: list[tuple[str, str]] = []
    try:
        for plan in plans:
            names = list(dict.fromkeys(plan.sel.names))
            counts[plan.split] = len(plan.sel.names)
            bar = Progress(len(names), desc=f"prepare [{plan.split}]", enabled=progress and len(names) >= 2000,
                           unit="img")
            for rel, n_out, was_resized, reason, n_in in _run(tree, names, prefix, out, max_side, quality, workers):
                bar.update()
                if reason is not None:
                    bad.append((tree.display(prefix + rel), reason))
                    continue
                resized += was_resized
                bytes_in += n_in
                bytes_out += n_out
            bar.close()
    finally:
        tree.close()
    if bad:
        raise _bad_files_error(name, bad, sum(counts.values()))
    _check_same_listing(src, str(out), prefix, progress)
    report = PrepareReport(out, counts, resized, bytes_in, bytes_out)
    atomic_write_text(out / MARKER, json.dumps({
        "source": name, "max_side": max_side, "quality": quality, "counts": counts, "resized": resized,
    }, indent=1))
    return report


def _run(tree, names: Sequence[str], prefix: str, out: Path, max_side: int, quality: int,
         workers: int) -> Iterator[tuple[str, int, bool, str | None, int]]:
    """Read members in the tree's order and shrink them here or in ``workers`` processes, keeping
    at most a few chunks in flight (an ImageNet split does not fit in memory)."""
    def chunks() -> Iterator[tuple[list[tuple[str, bytes]], list[tuple[str, str]]]]:
        job: list[tuple[str, bytes]] = []
        unreadable: list[tuple[str, str]] = []
        for n in names:
            if n in tree.problems:  # links, broken symlinks: never read
                unreadable.append((n[len(prefix):], tree.problems[n]))
        for n, data, reason in tree.read_many([n for n in names if n not in tree.problems]):
            rel = n[len(prefix):]
            if data is None:
                unreadable.append((rel, reason or "unreadable"))
            elif not data:
                unreadable.append((rel, "empty"))
            else:
                job.append((rel, data))
            if len(job) + len(unreadable) >= _CHUNK:
                yield job, unreadable
                job, unreadable = [], []
        if job or unreadable:
            yield job, unreadable

    if workers <= 0:
        for job, unreadable in chunks():
            sizes = dict((rel, len(d)) for rel, d in job)
            for rel, reason in unreadable:
                yield rel, 0, False, reason, 0
            for rel, n_out, r, reason in _work(job, str(out), max_side, quality):
                yield rel, n_out, r, reason, sizes[rel]
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: dict[Future, dict[str, int]] = {}
        for job, unreadable in chunks():
            for rel, reason in unreadable:
                yield rel, 0, False, reason, 0
            pending[pool.submit(_work, job, str(out), max_side, quality)] = {rel: len(d) for rel, d in job}
            while len(pending) >= 4 * workers:
                yield from _collect(pending, wait(pending, return_when=FIRST_COMPLETED).done)
        while pending:
            yield from _collect(pending, wait(pending, return_when=FIRST_COMPLETED).done)


def _collect(pending: dict[Future, dict[str, int]], done) -> Iterator[tuple[str, int, bool, str | None, int]]:
    for f in done:
        sizes = pending.pop(f)
        for rel, n_out, r, reason in f.result():
            yield rel, n_out, r, reason, sizes[rel]


def _check_same_listing(src: str, dst: str, prefix: str, progress: bool) -> None:
    """The copy must list as the source does: same splits, classes, labels and member order."""
    a = resolve_all(src, progress=progress)
    b = resolve_all(dst, progress=progress)
    try:
        same = [p.split for p in a] == [q.split for q in b] and all(
            p.sel.classes == q.sel.classes and len(p.sel.names) == len(q.sel.names)
            and (p.sel.labels is None) == (q.sel.labels is None)
            and (p.sel.labels is None or (p.sel.labels == q.sel.labels).all())
            and [n[len(prefix):] for n in p.sel.names] == q.sel.names
            for p, q in zip(a, b, strict=True)
        )
    finally:
        a[0].close()
        b[0].close()
    if not same:  # pragma: no cover - a bug, not a user error: the names are copied unchanged
        raise RuntimeError(f"the prepared copy {dst} does not list like {src}; please report this")

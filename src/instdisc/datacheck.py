"""``instdisc data check PATH``: decode every image of a source ahead of time and report problems.

`instdisc.sources.open_source` refuses a source with unreadable images (skipping one would shift
the dataset index of every later image), and a streamed source only finds a bad file when a
worker reaches it mid-epoch. This check finds them all at once: it fully decodes (Pillow
``load()``, which catches truncation) every image of every split of a folder, archive or PIC zip
layout, using the very same decoding function as `open_source`, and lists

* bad files: ``"empty"``, ``"unreadable"``, ``"truncated"``, ``"corrupt"``, ``"too large"``,
  ``"missing from the archive"`` (PIC map entries), links inside archives, ...;
* images whose mode is not plain RGB (``"L"``, ``"RGBA"``, ``"P"``, ``"I;16"``, ``"CMYK"``...):
  not errors -- they are converted to RGB on load -- but worth knowing (alpha is dropped, 16-bit
  precision is reduced).

Built-in sources (digits, synthetic, CIFAR python batches) have nothing to decode; they report
their image counts and are ok when readable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from instdisc.sources.decode import _decode_members
from instdisc.sources.plans import resolve_all

__all__ = ["CheckReport", "check_source"]

_SHOW = 50  # entries listed per section of the human-readable report


@dataclass
class CheckReport:
    """What `check_source` found.

    Attributes:
        path: the checked source (resolved path, or the built-in name).
        total: number of images (all splits).
        bad: ``(file path, reason)`` for every image that cannot be used.
        odd_modes: ``(file path, mode)`` for every image that is not plain RGB (converted on load).
        counts: images per split, e.g. ``{"train": 50000, "test": 10000}``.
        kind: the detected format (``imagefolder``, ``pic-zip``, ``cifar10-python``, ``digits``...).
    """

    path: str
    total: int
    bad: list[tuple[str, str]]
    odd_modes: list[tuple[str, str]]
    counts: dict[str, int] = field(default_factory=dict)
    kind: str = ""

    def ok(self) -> bool:
        """True when every image can be read (odd modes are fine: they are converted)."""
        return not self.bad

    def format(self) -> str:
        """A human-readable summary that lists every problem with its path (50 per section)."""
        splits = ", ".join(f"{s} {n:,}" for s, n in self.counts.items())
        lines = [f"{self.path}: {self.total:,} images" + (f" ({splits})" if splits else "")
                 + (f" [{self.kind}]" if self.kind else "")]
        if self.bad:
            lines.append(
                f"PROBLEM: {len(self.bad):,} file(s) cannot be read; `open_source` refuses this "
                "source until they are fixed or deleted (skipping them would shift every later "
                "dataset index):"
            )
            lines += [f"  {p}: {r}" for p, r in self.bad[:_SHOW]]
            if len(self.bad) > _SHOW:
                lines.append(f"  ... and {len(self.bad) - _SHOW:,} more")
        if self.odd_modes:
            modes = sorted({m for _, m in self.odd_modes})
            lines.append(
                f"note: {len(self.odd_modes):,} image(s) are not RGB (modes {', '.join(modes)}); "
                "they are converted to RGB when loaded (alpha dropped, 16-bit scaled to 8-bit):"
            )
            lines += [f"  {p}: {m}" for p, m in self.odd_modes[:_SHOW]]
            if len(self.odd_modes) > _SHOW:
                lines.append(f"  ... and {len(self.odd_modes) - _SHOW:,} more")
        lines.append("OK: every image decodes." if self.ok() else "NOT OK: fix or delete the files listed above.")
        return "\n".join(lines)


def check_source(spec: str, *, progress: bool = True, cache_dir: str | Path | None = None) -> CheckReport:
    """Decode every image of every split of ``spec`` and report bad files and non-RGB modes.

    Args:
        spec: anything `instdisc.sources.open_source` accepts.
        progress: print a progress line on stderr for big sources.
        cache_dir: where built-in CIFAR lives (default: the usual cache directory).

    Returns:
        The report; ``report.ok()`` is False when some image cannot be read.

    Raises:
        DataError: the source itself cannot be opened (missing path, empty folder, not an
            archive, class folder without images, no built-in CIFAR data, ...).
    """
    # The plans `open_source` reads (`instdisc.sources.plans`): the same splits, members and bad files.
    plans = resolve_all(spec, cache_dir=cache_dir, progress=progress)
    source = plans[0].source
    try:
        if source.kind in ("digits", "synthetic", "cifar10", "cifar100"):
            name = spec.strip().lower()
            counts = {p.split: p.count() for p in plans}
            return CheckReport(name, sum(counts.values()), [], [], counts, name.split(":")[0])
        if plans[0].arrays_built:  # CIFAR python batches: parsed (and so validated) by counting
            counts = {p.split: p.count() for p in plans}
            return CheckReport(source.name, sum(counts.values()), [], [], counts, "cifar-python")
        bad: list[tuple[str, str]] = []
        odd: list[tuple[str, str]] = []
        counts = {}
        kind = ""
        for plan in plans:
            tree, sel = plan.tree, plan.sel
            assert tree is not None
            kind = sel.fmt
            unique = list(dict.fromkeys(sel.names))
            counts[plan.split] = len(sel.names)
            rank = {n: i for i, n in enumerate(unique)}
            split_bad: list[tuple[int, str, str]] = []
            split_odd: list[tuple[int, str, str]] = []
            for n, img, mode, reason in _decode_members(
                tree, sel, progress=progress, desc=f"check {Path(source.name).name} [{plan.split}]"
            ):
                shown = tree.display(n)
                if img is None:  # includes empty, missing and link members, as in open_source
                    split_bad.append((rank[n], shown, reason or "unreadable"))
                elif mode != "RGB":
                    split_odd.append((rank[n], shown, mode or "?"))
            bad += [(p, r) for _, p, r in sorted(split_bad)]
            odd += [(p, m) for _, p, m in sorted(split_odd)]
    finally:
        source.close()
    return CheckReport(source.name, sum(counts.values()), bad, odd, counts, kind)  # splits in SPLITS order

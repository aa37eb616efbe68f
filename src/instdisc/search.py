"""Retrieval: the nearest images of an index for each query image (NPID's nearest-neighbour figure,
a query and its 20 retrievals), as an HTML page and a CSV.

    instdisc search RUN --query IMG|DIR [--index DATA] [-k 20] --out DIR

* The query is one image file, or a folder (or archive) of images, with or without class folders.
* The index is any source `instdisc.sources.open_source` reads (its train split), by default the
  run's own training data; an unlabelled folder of images works as well.
* Similarity is the cosine of the model's embedding, exactly as the kNN monitor measures it; the
  neighbours come from `evaluate.nearest` (exact chunked top-k in torch, or faiss's exact inner
  product index for large indexes, `evaluate.resolve_backend`).
* The index's features are computed once: `evaluate.extract` caches them under
  RUN_DIR/eval/features, keyed by the checkpoint and by the index's content, so a second search
  of the same index embeds only the queries (and the kNN commands share that cache).

Output: DIR/index.html (one row per query: its thumbnail, then the k retrievals with file name
and similarity), DIR/results.csv (query, rank, index, file, similarity) and DIR/thumbs/*.png,
the thumbnails the page shows (relative links: the folder works offline, moved as a whole).
"""

from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from instdisc.errors import DataError, UserError

THUMB = 96  # side of a thumbnail on the page, in pixels
CSV_COLUMNS = ("query", "rank", "index", "file", "similarity")


@dataclass
class SearchResult:
    """The k nearest index images of each query.

    Attributes:
        sims: (Q, k) cosine similarities, descending along each row.
        indices: (Q, k) rows of the index.
        query_names: Q names (the file as given, or paths inside the query folder).
        index_names: N names (paths inside the index source), or None for sources without files.
        queries, index: the `ImageSet`s (for the thumbnails).
        cached: the index's features came from the feature cache.
    """

    sims: Tensor
    indices: Tensor
    query_names: list[str]
    index_names: list[str] | None
    queries: Any
    index: Any
    cached: bool = False


def _check_not_someone_elses(d: Path) -> None:
    """An existing --out may hold an earlier search (replaced: the usual rerun), or files of any
    other name (left alone); an index.html, results.csv or thumbs/ that no search wrote would be
    replaced or pruned, so it is refused."""
    csv_path, thumbs = d / "results.csv", d / "thumbs"
    ours_csv = False
    if csv_path.is_file():
        with csv_path.open(encoding="utf-8", errors="replace") as f:
            ours_csv = f.readline().rstrip("\n") == ",".join(CSV_COLUMNS)
    foreign = [name for name, ok in (
        ("results.csv", not csv_path.exists() or ours_csv),
        ("index.html", not (d / "index.html").exists() or ours_csv),
        ("thumbs/", not thumbs.exists() or (thumbs.is_dir() and all(
            re.fullmatch(r"[qi]\d+\.png", p.name) for p in thumbs.iterdir()))),
    ) if not ok]
    if foreign:
        raise UserError(f"--out {str(d)!r} already holds {', '.join(foreign)} that no `instdisc search` wrote; "
                        "a search would replace them. Give a new or empty folder (or that of an earlier search).")


def check_out_dir(out: str | Path, *, make: bool = False) -> Path:
    """--out is a folder, or can be made: checked before any work (``make``: made, with thumbs/)."""
    import os

    d = Path(out)
    if d.exists() and not d.is_dir():
        other = d.with_suffix("") if d.suffix else d.with_name(d.name + "-search")  # never the same path
        raise UserError(f"--out {str(d)!r} is a file; give a folder for index.html and results.csv (e.g. "
                        f"{str(other)!r}).")
    if d.is_dir():
        _check_not_someone_elses(d)
    if not make:
        parent = next((p for p in (d, *d.parents) if p.exists()), Path("."))
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"--out: cannot write in {str(d)!r}: {str(parent)!r} is not a writable folder.")
        return d
    try:
        (d / "thumbs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create the folder {str(d)!r}: {e.strerror or e}.") from None
    return d


def _single_image(path: Path, subject: Any):  # noqa: ANN202
    """One image file -> a one-row `ArrayImageSet`, stored as the sources would store it: at the
    run's --image-size if it had one, else as it is when small (<= 64 px) and as the streamed
    evaluation view (short side resized, centre crop) when large, so that an image searched alone
    gets the features it gets inside a folder."""
    from instdisc.sources import ArrayImageSet, BadImageError, decode_image, fit_image
    from instdisc.sources.decode import SMALL_IMAGE_MAX_SIDE
    from instdisc.sources.images import centre_view, eval_resize_side

    try:
        img, _ = decode_image(path.read_bytes())
    except BadImageError as e:
        raise UserError(f"--query {str(path)!r} cannot be decoded as an image: {e.reason}.") from None
    except OSError as e:
        raise UserError(f"--query {str(path)!r} cannot be read: {e.strerror or e}.") from None
    if subject.image_size:
        arr = np.array(fit_image(img, (subject.image_size, subject.image_size)))
    elif max(img.size) <= SMALL_IMAGE_MAX_SIDE:
        arr = np.array(img)
    else:
        arr = centre_view(img, eval_resize_side(subject.size), subject.size)
    return ArrayImageSet(arr[None], None, [], name=str(path), split="train", meta={"files": [str(path)]})


def open_query(subject: Any, query: str, *, cache_dir: str | None = None, progress: bool = False):  # noqa: ANN201
    """--query: one image file, or a folder / archive of images (its train split) -> `ImageSet`."""
    from instdisc.evaluate import open_images
    from instdisc.sources import IMAGE_EXTENSIONS

    p = Path(query).expanduser()
    if not p.exists():
        raise UserError(f"--query {query!r} does not exist; give an image file or a folder of images.")
    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
        return _single_image(p, subject)
    try:
        return open_images(subject, str(p), "train", cache_dir=cache_dir, progress=progress)
    except DataError as e:
        raise UserError(f"--query {query!r}: {e}") from None


def open_index(subject: Any, index: str | None, *, cache_dir: str | None = None, progress: bool = False):  # noqa: ANN201
    """--index (default: the run's training data), its train split -> `ImageSet`."""
    from instdisc.evaluate import open_images

    if index is not None and not index.strip():
        raise UserError("--index is empty; give a folder or archive of images, or leave it out for the run's "
                        "training data.")
    try:
        return open_images(subject, index, "train", cache_dir=cache_dir, progress=progress)
    except DataError as e:
        what = f"--index {index!r}" if index is not None else f"the run's training data {subject.data!r} (--index)"
        raise UserError(f"{what}: {e}") from None


def _names(images: Any) -> list[str] | None:
    paths = images.paths()
    return None if paths is None else [str(p) for p in paths]


@torch.no_grad()
def search(
    run: str | Path,
    query: str,
    *,
    index: str | None = None,
    k: int = 20,
    backend: str = "auto",
    device: str = "auto",
    batch_size: int = 256,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> SearchResult:
    """The k nearest `index` images (cosine similarity of the embedding) of every `query` image.

    Args:
        run: a run directory, an instdisc checkpoint or released weights (those need `index`).
        query: an image file, or a folder / archive of images.
        index: a source (see `instdisc.sources`); default the run's training data.
        k: neighbours per query, 1 <= k <= the index's size.
        backend: "auto", "torch" or "faiss" (`evaluate.resolve_backend`).
        use_cache: reuse / write the index's features under RUN_DIR/eval/features.
    Raises:
        UserError: a missing or unreadable query or index, an empty one, k above the index's size,
            faiss asked for but not installed.
    """
    from instdisc.evaluate import extract, load_subject, nearest, resolve_backend

    if k < 1:
        raise UserError(f"-k must be at least 1; got {k}.")
    subject = load_subject(run, device=device)
    if index is None and not subject.data:
        raise UserError("--index is needed: released weights do not say what they were trained on.")
    queries = open_query(subject, query, cache_dir=cache_dir, progress=progress)
    images = open_index(subject, index, cache_dir=cache_dir, progress=progress)
    if len(queries) == 0:
        raise UserError(f"--query {query!r} holds no images.")
    if k > len(images):
        raise UserError(f"-k {k} is more than the {len(images)} images of the index ({images.name}); give -k "
                        f"{len(images)} or less.")
    chosen = resolve_backend(backend, len(images))  # before minutes of embedding: faiss missing is an error now
    cache = subject.run_dir / "eval" / "features" if use_cache and subject.run_dir is not None else None
    module = subject.module
    was_training = module.training
    module.eval()
    try:
        before = _cache_files(cache)
        bank = extract(subject, images, "embedding", batch_size=batch_size, cache=cache, progress=progress)  # (N, D)
        cached = cache is not None and before == _cache_files(cache) and bool(before)
        q = extract(subject, queries, "embedding", batch_size=batch_size, progress=progress)  # (Q, D)
    finally:
        module.train(was_training)
    sims, idx = nearest(q, bank, k, backend=chosen)  # (Q, k) each
    return SearchResult(sims.float().cpu(), idx.cpu(), _names(queries) or [f"#{i}" for i in range(len(queries))],
                        _names(images), queries, images, cached=cached)


def _cache_files(cache: Path | None) -> dict[str, int]:
    """{feature file: mtime_ns} of the cache folder: unchanged across `extract` = a cache hit."""
    if cache is None or not cache.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in cache.glob("*-embedding-*.npy")}


def _index_name(res: SearchResult, j: int) -> str:
    return res.index_names[j] if res.index_names is not None else ""


def results_csv(res: SearchResult) -> str:
    """CSV text: one row per (query, rank): query name, rank (1 = nearest), index row, the index
    image's file (empty for sources without files), cosine similarity."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for qi, (srow, irow) in enumerate(zip(res.sims.tolist(), res.indices.tolist(), strict=True)):
        for rank, (s, j) in enumerate(zip(srow, irow, strict=True), start=1):
            w.writerow([res.query_names[qi], rank, j, _index_name(res, j), f"{s:.6f}"])
    return buf.getvalue()


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:20px;color:#222}
h1{font-size:20px;margin-bottom:4px}.sub{color:#666;font-size:13px}
.q{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;margin:14px 0;padding-bottom:10px;border-bottom:1px solid #ddd}
figure{margin:0;width:CELLpx;font-size:11px;text-align:center}figure img{width:THUMBpx;height:THUMBpx;image-rendering:pixelated}
.query img{outline:3px solid #286edc}.query{margin-right:12px}figcaption{overflow-wrap:anywhere}.s{font-weight:bold}
""".replace("CELL", str(THUMB + 8)).replace("THUMB", str(THUMB))


def write_results(res: SearchResult, out: str | Path) -> list[Path]:
    """DIR/index.html, DIR/results.csv and DIR/thumbs/*.png (each written atomically); returns the
    page and the CSV."""
    from instdisc.checkpoint import atomic_write, atomic_write_text
    from instdisc.visual import thumbnail

    d = check_out_dir(out, make=True)

    def thumb(images: Any, i: int, name: str) -> str:
        target = d / "thumbs" / name
        img = thumbnail(images.read(i), THUMB)
        try:
            atomic_write(target, lambda tmp: img.save(tmp, format="PNG"))
        except OSError as e:
            raise UserError(f"--out: cannot write {str(target)!r}: {e.strerror or e}.") from None
        return f"thumbs/{name}"

    index_thumbs = {j: thumb(res.index, j, f"i{j}.png") for j in sorted(set(res.indices.flatten().tolist()))}
    classes = list(res.index.classes) if res.index.labels is not None else []
    esc = html.escape
    rows = []
    for qi, (srow, irow) in enumerate(zip(res.sims.tolist(), res.indices.tolist(), strict=True)):
        qname = res.query_names[qi]
        cells = [f'<figure class="query"><img src="{thumb(res.queries, qi, f"q{qi}.png")}" alt="query {qi}" '
                 f'title="{esc(qname)}"><figcaption>{esc(Path(qname).name or qname)}</figcaption></figure>']
        for rank, (s, j) in enumerate(zip(srow, irow, strict=True), start=1):
            name = _index_name(res, j)
            label = f" · {esc(classes[int(res.index.labels[j])])}" if classes else ""
            shown = esc(Path(name).name) if name else f"#{j}"
            cells.append(f'<figure><img src="{index_thumbs[j]}" alt="rank {rank}" title="{esc(name or f"index row {j}")}">'
                         f'<figcaption>{rank}. {shown}{label}<br><span class="s">{s:.3f}</span></figcaption></figure>')
        rows.append(f'<div class="q">{"".join(cells)}</div>')
    k = res.indices.shape[1]
    title = f"{len(res.query_names)} queries, {k} nearest of {len(res.index)} index images"
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class='sub'>index: {esc(str(res.index.name))}; blue: the query; then its nearest "
        "index images by cosine similarity of the embedding (under each: rank, file, similarity).</p>"
        + "".join(rows) + "</body></html>"
    )
    # thumbnails of an earlier search into the same folder that this page does not show
    shown = {f"q{i}.png" for i in range(len(res.query_names))} | {f"i{j}.png" for j in index_thumbs}
    for old in (d / "thumbs").glob("*.png"):
        if re.fullmatch(r"[qi]\d+\.png", old.name) and old.name not in shown:
            old.unlink(missing_ok=True)
    page_path, csv_path = d / "index.html", d / "results.csv"
    atomic_write_text(csv_path, results_csv(res))
    atomic_write_text(page_path, page)
    return [page_path, csv_path]

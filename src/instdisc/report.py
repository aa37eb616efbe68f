"""One self-contained HTML page per run: `instdisc report RUN_DIR` -> RUN_DIR/report.html.

The page holds everything inline (images as base64 PNG, charts as SVG, no external files, no
network), so it can be mailed or archived alone:

* the run's configuration and its final numbers, every value written by `visual.format_number`;
* the command that started the run (RUN_DIR/command.json, `record_command`) and a line that
  trains it again into a new folder;
* training curves from metrics.jsonl: loss and learning rate per logged step, the kNN monitor per
  epoch, and a chart for every other number the method logs per epoch (SeLa's NMI, label
  accuracy...), one line per head for numbers logged per head; numbers logged once or constant
  are a table;
* the evaluation tables found in RUN_DIR/eval/ (written by `instdisc knn/linear/lowshot/stages`
  on the run), plus a kNN sweep computed here (cheap once the features are cached);
  `--full` also runs the linear probe, low-shot and per-stage protocols;
* a neighbour grid (test queries and their 20 nearest training images, with their similarities)
  and a 2-D map of the test embedding (t-SNE up to 5,000 points, PCA above);
* cluster grids and metrics for methods with pseudo-labels (SeLa), drawn with `instdisc.cluster`,
  and any PNG under RUN_DIR/figures/ or RUN_DIR/clusters/ (`instdisc clusters` writes there).

Whatever cannot be made (no checkpoint yet, data not reachable from here) is listed with the
reason instead of failing the page. A small script marks <html data-status="ok"> once every image
has decoded and no script error occurred (what the browser test checks).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from instdisc import __version__
from instdisc.checkpoint import atomic_write_text, check_out_file
from instdisc.errors import CheckpointError, UserError
from instdisc.visual import format_number

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:14px;margin:14px 0 6px}.sub{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 12px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.charts{display:flex;flex-wrap:wrap;gap:12px}
.note{color:#8a5a00;background:#fff8e6;border:1px solid #f0deb0;padding:6px 10px;font-size:12.5px;margin:6px 0}
figure{margin:8px 0}figcaption{font-size:12px;color:#555}img{max-width:100%;image-rendering:pixelated}
details summary{cursor:pointer;font-size:13px}
pre.cmd{background:#f6f6f6;border:1px solid #ddd;padding:6px 10px;font-size:12.5px;white-space:pre-wrap;word-break:break-all;user-select:all}
"""

# Sets data-status on <html>: "ok" when every <img> decoded and no script error fired, else "error".
_STATUS_JS = """
(function(){var errs=[];window.addEventListener('error',function(e){errs.push(String(e.message||'resource failed'));},true);
window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);
var bad=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);});var r=document.documentElement;
r.setAttribute('data-images',String(imgs.length));
if(bad.length){r.setAttribute('data-bad-images',bad.map(function(i){return i.alt||'?';}).join('|'));}
if(errs.length){r.setAttribute('data-errors',errs.join('|'));}
r.setAttribute('data-status',(bad.length||errs.length)?'error':'ok');});})();
"""

_STEP_SKIP = {"type", "step", "epoch"}
_EPOCH_SKIP = {"type", "epoch", "step", "time_s", "img_per_s", "loss", "knn_top1", "knn_top5"}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of records; unreadable lines (a crash mid-write) are skipped."""
    path = run_dir / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


_PER_HEAD = re.compile(r"^(?P<base>.+)_h(?P<head>\d+)$")  # "nmi_h3": head 3's value (SeLa logs these)


# instdisc.quality's signals: chart titles that say what each is and which way is better.
_QUALITY = {
    "align": "alignment of two views, no labels (lower: closer)",
    "uniform": "uniformity, no labels (lower: more spread; 0 = collapse)",
    "rankme": "effective rank RankMe, no labels (higher: more dimensions used)",
    "nn_agree": "neighbour agreement with the previous evaluation, no labels",
}


def training_charts(records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """SVG charts of the training log (loss, lr, kNN monitor, then every other per-epoch number)
    and the rows of a table for the numbers not worth a chart.

    A number logged per head ("nmi_h0", "nmi_h1", ...) is one chart with one line per head (the
    mean over heads the method also logs is then left out: it is one of those lines' average). A
    series with fewer than two points, or the same value at every point (e.g. a count of heads, a
    one-off start-up time), is a row of the table instead: its chart would be a dot or a flat line.
    """
    from instdisc.visual import svg_line_chart

    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    charts: list[str] = []
    values: list[dict[str, Any]] = []

    def pts(recs: list[dict[str, Any]], xkey: str, key: str) -> list[tuple[float, float]]:
        return [(r[xkey], r[key]) for r in recs if _num(r.get(key)) and _num(r.get(xkey))]

    def add(title: str, xlabel: str, series: dict[str, list[tuple[float, float]]]) -> None:
        series = {name: p for name, p in series.items() if p}
        if not series:
            return
        if all(len(p) < 2 or len({y for _, y in p}) == 1 for p in series.values()):
            for name, p in series.items():
                where = f"{xlabel} {format_number(p[0][0])}"
                if len(p) > 1:
                    where = f"{len(p)} times, {xlabel}s {format_number(p[0][0])} to {format_number(p[-1][0])}, constant"
                values.append({"number": title if len(series) == 1 else f"{title}, {name}", "value": p[-1][1],
                               "logged": where})
            return
        charts.append(svg_line_chart({name: ([a for a, _ in p], [b for _, b in p]) for name, p in series.items()},
                                     title=title, xlabel=xlabel))

    if len(steps) >= 3:  # else the per-epoch means say more
        add("training loss", "step", {"loss": pts(steps, "step", "loss")})
        add("learning rate", "step", {"lr": pts(steps, "step", "lr")})
    elif epochs:
        add("training loss (epoch mean)", "epoch", {"loss": pts(epochs, "epoch", "loss")})
    knn = {k.replace("knn_", ""): pts(epochs, "epoch", k) for k in ("knn_top1", "knn_top5")}
    if knn["top1"]:
        add("kNN monitor (%)", "epoch", knn)
    for key, title in _QUALITY.items():  # the label-free signals, after kNN and named (docs/quality.md)
        add(title, "epoch", {key: pts(epochs, "epoch", key)})
    keys = sorted({k for r in epochs for k, v in r.items() if k not in _EPOCH_SKIP and k not in _QUALITY and _num(v)})
    per_head: dict[str, dict[int, str]] = {}
    for k in keys:
        m = _PER_HEAD.match(k)
        if m:
            per_head.setdefault(m["base"], {})[int(m["head"])] = k
    for base in sorted({_PER_HEAD.match(k)["base"] if _PER_HEAD.match(k) else k for k in keys}):  # type: ignore[index]
        if base in per_head:
            add(base, "epoch", {f"head {h}": pts(epochs, "epoch", per_head[base][h]) for h in sorted(per_head[base])})
        else:
            add(base, "epoch", {base: pts(epochs, "epoch", base)})
    return charts, values


def _table(rows: list[dict[str, Any]], columns: list[str], headers: list[str] | None = None) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else html.escape(format_number(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in (headers or columns))
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f'<tr><td class="l">{html.escape(str(k))}</td><td class="l">{html.escape(format_number(v))}</td></tr>'
                   for k, v in d.items())
    return f"<table>{rows}</table>"


def evaluation_html(results: dict[str, dict[str, Any]]) -> str:
    """The tables of RUN_DIR/eval/*.json, in a fixed order."""
    parts = []
    for name in sorted(results, key=lambda n: (not n.startswith("knn"), not n.startswith("linear"), n)):
        res = results[name]
        title = html.escape(name.replace("_", " "))
        when = html.escape(str(res.get("date", "")))
        if res.get("stale"):
            when += (" — <b class='stale'>STALE: computed before the current checkpoint, i.e. for an older model; "
                     "run the protocol again</b>")
        if name.startswith("knn") and res.get("rows"):
            parts.append(f"<h3>weighted kNN sweep ({title})</h3><p class='sub'>{when}; features: "
                         f"{html.escape(str(res.get('features', '')))}</p>")
            parts.append(_table(res["rows"], ["k", "t", "top1", "top5"], ["k", "τ", "top-1 %", "top-5 %"]))
        elif name.startswith("linear") and "top1" in res:
            row = {k: res.get(k) for k in ("features", "norm", "top1", "top5", "lr", "epochs", "batch_size", "weight_decay")}
            parts.append(f"<h3>linear probe ({title})</h3><p class='sub'>{when}</p>")
            parts.append(_table([row], list(row), ["features", "input norm", "top-1 %", "top-5 %", "lr", "epochs",
                                                   "batch", "weight decay"]))
        elif name.startswith("lowshot") and res.get("rows"):
            rows = [{"k": r["k"], "acc": (f"{format_number(float(r['mean']))} ± {format_number(float(r['std']))}"
                                          if "mean" in r else r.get("skipped", "")),
                     "draws": len(r.get("runs", []))} for r in res["rows"]]
            parts.append(f"<h3>low-shot ({title})</h3><p class='sub'>{when}; {html.escape(str(res.get('classifier', '')))}"
                         f", C={html.escape(format_number(res.get('C', '')))}, features: "
                         f"{html.escape(str(res.get('features', '')))}</p>")
            parts.append(_table(rows, ["k", "acc", "draws"], ["images per class", "top-1 % (mean ± std)", "draws"]))
        elif name.startswith("stages") and res.get("rows"):
            parts.append(f"<h3>per-stage evaluation ({title})</h3><p class='sub'>{when}</p>")
            parts.append(_table(res["rows"], ["stage", "dim", "linear_top1", "linear_top5", "knn_top1"],
                                ["stage", "dim", "linear top-1 %", "linear top-5 %", "kNN top-1 %"]))
        else:
            parts.append(f"<h3>{title}</h3><details><summary>raw result</summary><pre>"
                         f"{html.escape(json.dumps(res, indent=1)[:4000])}</pre></details>")
    return "".join(parts)


def _img(uri: str, alt: str, caption: str) -> str:
    return (f'<figure><img src="{uri}" alt="{html.escape(alt)}"><figcaption>{html.escape(caption)}</figcaption>'
            "</figure>")


def neighbour_figure(ev, *, queries: int, k: int, seed: int, indices: list[int] | None = None) -> tuple[Image.Image, str]:
    """Grid of test images (`indices`, else `queries` seeded random ones) and their k nearest
    training images."""
    from instdisc.evaluate import nearest
    from instdisc.visual import neighbour_grid

    n = len(ev.test_images)
    if indices:
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise UserError(f"query indices {bad} are outside the test set (0..{n - 1}).")
        q_idx = np.asarray(indices, dtype=np.int64)
    else:
        if queries < 1:
            raise UserError(f"--queries must be at least 1; got {queries}.")
        q_idx = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
    if k < 1:
        raise UserError(f"-k must be at least 1; got {k}.")
    if k > ev.train_x.shape[0]:  # `nearest` would quietly draw fewer columns than asked for
        raise UserError(f"-k {k} is more than the {ev.train_x.shape[0]} training images.")
    sims, nn_idx = nearest(ev.test_x[torch.from_numpy(q_idx)], ev.train_x, k)
    qy = ev.test_y[torch.from_numpy(q_idx)]
    agree = (ev.train_y[nn_idx] == qy[:, None]).tolist()
    names = ev.classes or []
    caps = [names[int(y)] if int(y) < len(names) else str(int(y)) for y in qy]
    img = neighbour_grid([ev.test_images.read(int(i)) for i in q_idx],
                        [[ev.train_images.read(int(j)) for j in row] for row in nn_idx.tolist()],
                        agree, captions=caps, sims=sims.tolist())
    frac = 100.0 * float(np.mean(agree)) if agree else 0.0
    return img, (f"{len(q_idx)} test images (blue, their class under them) and their {nn_idx.shape[1]} nearest "
                 f"training images by cosine similarity of the embedding (the similarity under each); green = same "
                 f"label as the query, red = different ({format_number(frac)}% agree). Test indices: "
                 f"{', '.join(map(str, q_idx.tolist()))}.")


def map_figure(x: torch.Tensor, y: torch.Tensor, classes: list[str], *, method: str, max_points: int,
               seed: int, progress: bool = False) -> tuple[Image.Image, str]:
    """A 2-D map of (a seeded subsample of) the test embedding; method "auto" picks t-SNE for up to
    `visual.TSNE_MAX_POINTS` points and PCA above (the caption says which, and why). ``progress``:
    say on stderr when a t-SNE starts (its optimiser reports nothing; ~20 s for 5,000 points here)."""
    from instdisc.visual import TSNE_MAX_POINTS, embed_2d, map_method_for, scatter_map

    n = x.shape[0]
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_points), replace=False))
    chosen = map_method_for(len(idx), method)
    name = {"pca": "PCA", "tsne": "t-SNE"}[chosen]
    if progress and chosen == "tsne" and len(idx) >= 1000:
        print(f"map: t-SNE of {format_number(len(idx))} points (tens of seconds; no progress to show)...",
              file=sys.stderr, flush=True)
    xy = embed_2d(x[torch.from_numpy(idx)], chosen, seed=seed)
    img = scatter_map(xy, y.numpy()[idx], classes, title=f"{name} of the test embedding ({len(idx)} points)")
    why = ""
    if method == "auto":
        why = (f" {name}, chosen for {format_number(len(idx))} points: t-SNE up to {format_number(TSNE_MAX_POINTS)} "
               "points (it separates what the top two principal components mix), PCA above (t-SNE's cost grows "
               "with the points).")
    sample = "all" if len(idx) == n else f"{format_number(len(idx))} of"
    return img, (f"{name} of {sample} {format_number(n)} test embeddings"
                 f"{'' if len(idx) == n else ' (seeded subsample)'}, coloured by label.{why}")


def cluster_section(subject, ev) -> tuple[str, list[str]]:
    """Cluster grids and metrics of a clustering method's pseudo-labels (a buffer named "labels",
    (N,) or (H, N), as SeLa keeps them), drawn by `instdisc.cluster` where it exists.

    Every head is shown; the heads whose number of clusters equals the number of classes come first
    (the only ones with a Hungarian-matched accuracy against the classes).

    Returns (html, notes); ("", []) for methods without pseudo-labels.
    """
    n = len(ev.train_images)
    labels = next((b for name, b in subject.module.named_buffers() if name.split(".")[-1] == "labels"
                   and b.ndim in (1, 2) and b.shape[-1] == n and not b.is_floating_point()), None)
    if labels is None:
        return "", []
    from instdisc import cluster
    from instdisc.visual import png_data_uri

    labels = labels.reshape(-1, n).cpu()  # (H, N)
    true = ev.train_y.numpy()
    num_classes = int(ev.num_classes)
    sizes = getattr(subject.module, "sizes", None)  # K per head, where the method keeps it (SeLa does)
    if not (isinstance(sizes, (list, tuple)) and len(sizes) == labels.shape[0]):
        sizes = [int(labels[h].max()) + 1 for h in range(labels.shape[0])]  # else the largest id used
    order = sorted(range(labels.shape[0]), key=lambda h: (int(sizes[h]) != num_classes, h))
    parts, rows, notes = [], [], []
    for h in order:
        pred = labels[h].numpy()
        k = int(sizes[h])
        try:
            m = cluster.cluster_metrics(pred, true, num_clusters=k, num_classes=num_classes)
            rows.append({"head": h, "clusters": k, "used": int(len(np.unique(pred))),
                         **{key: 100.0 * v for key, v in m.items()}})
            img = cluster.cluster_grid(ev.train_images, pred, true, class_names=ev.classes or None, seed=h)
        except Exception as e:  # a figure must not take the whole report down
            notes.append(f"cluster grid of head {h} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        parts.append(_img(png_data_uri(img.convert("RGB")), f"clusters of head {h}",
                          f"head {h} (K = {k}): the purest clusters of the checkpoint's pseudo-labels, random "
                          "members each (caption: majority class and its share)"))
    if not parts and not rows:
        return "", notes
    cols = ["head", "clusters", "used", "nmi", "ari", "purity", "acc"]
    table = _table(rows, cols, ["head", "clusters K", "clusters used", "NMI %", "ARI %", "purity %",
                                "accuracy % (Hungarian, K = classes only)"]) if rows else ""
    first = (f"; the head{'s' if sum(int(k) == num_classes for k in sizes) > 1 else ''} with K = {num_classes} "
             "(the number of classes) first" if any(int(k) == num_classes for k in sizes) else "")
    return (f"<h2>Clusters</h2><p class='sub'>all {labels.shape[0]} head(s){first}; metrics in % against the "
            f"ground-truth labels</p>{table}" + "".join(parts)), notes


def build_report(
    run_dir: str | Path,
    *,
    data: str | None = None,
    device: str = "auto",
    queries: int = 8,
    k: int = 20,
    map_method: str = "auto",
    map_points: int = 2000,
    full: bool = False,
    seed: int = 0,
    batch_size: int = 256,
    cache_dir: str | None = None,
    drop_unknown: bool = False,
    progress: bool = False,
    out: str | Path | None = None,
) -> Path:
    """Write RUN_DIR/report.html (or `out`) and return its path.

    Args:
        data: source to evaluate on (default: the run's own).
        queries, k: rows and neighbours of the neighbour grid.
        map_method: "auto" (t-SNE up to `visual.TSNE_MAX_POINTS` points, PCA above), "pca" or "tsne"
            for the 2-D map; map_points: its (seeded) subsample size.
        full: also run the linear probe, low-shot and per-stage protocols (saved to RUN_DIR/eval).
    """
    from instdisc import evaluate as E
    from instdisc.visual import png_data_uri

    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{str(run)!r} is not a run directory.")
    target = Path(out) if out else run / "report.html"
    if target.is_dir():  # checked before minutes of embedding, not at the end
        raise UserError(f"--out {str(target)!r} is a folder; give the HTML file to write, e.g. {str(target / 'report.html')!r}.")
    check_out_file(target)
    cfg: dict[str, Any] = {}
    if (run / "config.json").is_file():
        try:
            cfg = json.loads((run / "config.json").read_text())
        except ValueError:
            cfg = {}
    records = read_metrics(run)
    if not cfg and not records and not (run / "checkpoints").is_dir():
        raise UserError(f"{str(run)!r} holds no run (no config.json, metrics.jsonl or checkpoints/).")
    notes: list[str] = []
    figures: list[str] = []
    t0 = time.perf_counter()

    ev = None
    try:
        ev = E.features_for(str(run), data=data, kind="embedding", device=device, batch_size=batch_size,
                            cache_dir=cache_dir, drop_unknown=drop_unknown, progress=progress)
    except UserError as e:
        # a source the user asked for that cannot be evaluated, or a checkpoint that is there but
        # corrupt: an error, not a footnote (a run with no checkpoint yet still gets its page)
        if data or isinstance(e, CheckpointError):
            raise
        notes.append(f"no features, so no neighbours, map or kNN table: {e}")
    if ev is not None:
        rows = E.knn_table(ev.train_x, ev.train_y, ev.test_x, ev.test_y, ks=E.DEFAULT_KS,
                           ts=(cfg.get("run", {}).get("knn_t", 0.07),), num_classes=ev.num_classes)
        E.save_result(ev.save_dir, "knn", {"features": "embedding", "rows": rows, "source": ev.train_images.name})
        # The page's grid shows at most the training set (a 12-image run still gets its report;
        # the caption says how many neighbours); `instdisc neighbours -k` beyond N is an error.
        img, cap = neighbour_figure(ev, queries=queries, k=min(k, ev.train_x.shape[0]), seed=seed)
        figures.append(f"<h2>Nearest neighbours</h2>{_img(png_data_uri(img), 'neighbour grid', cap)}")
        img, cap = map_figure(ev.test_x, ev.test_y, ev.classes, method=map_method, max_points=map_points, seed=seed,
                              progress=progress)
        figures.append(f"<h2>Test embedding in 2-D</h2>{_img(png_data_uri(img), '2-D map', cap)}")
        if full:
            _run_full(ev, notes, data=data, device=device, batch_size=batch_size, cache_dir=cache_dir,
                      drop_unknown=drop_unknown, progress=progress)
        if ev.subject is not None:
            section, cnotes = cluster_section(ev.subject, ev)
            notes += cnotes
            if section:
                figures.append(section)
    # PNGs the run or other tools wrote (e.g. `instdisc clusters` -> RUN_DIR/clusters/*.png).
    extra = [p for d in ("figures", "clusters") if (run / d).is_dir() for p in sorted((run / d).glob("*.png"))]
    if extra:
        figures.append("<h2>Figures written by the run</h2>" + "".join(
            _img("data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii"), p.name, p.name)
            for p in extra))

    page = _page(run, cfg, records, E.load_results(run), figures, notes, time.perf_counter() - t0)
    atomic_write_text(target, page)
    return target


def _run_full(ev, notes: list[str], **kw: Any) -> None:
    from instdisc import evaluate as E

    run = str(ev.subject.run_dir) if ev.subject is not None and ev.subject.run_dir is not None else None
    if run is None:
        return
    try:
        bb = E.features_for(run, kind="backbone", **kw)
        shown = bool(kw.get("progress"))
        res = E.linear_probe(bb.train_x, bb.train_y, bb.test_x, bb.test_y, num_classes=bb.num_classes, progress=shown)
        E.save_result(bb.save_dir, "linear", {"features": "backbone", **res})
        rows = E.low_shot(bb.train_x, bb.train_y, bb.test_x, bb.test_y, progress=shown)
        E.save_result(bb.save_dir, "lowshot", {"features": "backbone", "classifier": "svm", "C": 1.0, "rows": rows})
        st = E.features_for(run, kind="stages", **kw)
        rows = E.stage_table(E.split_stages(st.train_x, st.stage_dims), st.train_y,
                             E.split_stages(st.test_x, st.stage_dims), st.test_y, num_classes=st.num_classes,
                             progress=shown)
        E.save_result(st.save_dir, "stages", {"rows": rows})
    except UserError as e:
        notes.append(f"--full evaluation stopped: {e}")


COMMAND_FILE = "command.json"  # RUN_DIR/command.json: the `instdisc train` command line that started the run


def record_command(run_dir: str | Path, argv: list[str], *, world_size: int = 1, resumed: bool = False,
                   command: str = "train") -> None:
    """Write RUN_DIR/command.json: the `instdisc train` (or `demo`: ``command``) arguments of this
    launch, its working directory and number of processes, so the report can print the command
    that rebuilds the run.

    Called by `instdisc train` and `instdisc demo` once training returned (the folder is then this run's). A launch
    that continues a run (--resume) keeps the file of the launch that started it, which is the
    command to rerun; it writes one only where none exists (marked "resumed"). Nothing is written
    before the first checkpoint, so `--resume auto` still finds an unstarted folder as one.
    """
    from instdisc.checkpoint import LAST, PREV, checkpoint_dir

    run = Path(run_dir)
    path = run / COMMAND_FILE
    if (resumed and path.is_file()) or not any((checkpoint_dir(run) / f).is_file() for f in (LAST, PREV)):
        return
    # torchrun and srun tell each process how many run on its node: one node -> a standalone launch
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or str(world_size)
    payload = {"argv": ["instdisc", command, *map(str, argv)], "cwd": os.getcwd(), "world_size": int(world_size),
               "nodes": max(1, int(world_size) // max(1, int(local))) if local.isdigit() else None,
               "resumed": bool(resumed), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(path, json.dumps(payload, indent=2))


def read_command(run_dir: str | Path) -> dict[str, Any] | None:
    """RUN_DIR/command.json as written by `record_command`, or None (absent or unreadable)."""
    try:
        cmd = json.loads((Path(run_dir) / COMMAND_FILE).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(cmd, dict) and isinstance(cmd.get("argv"), list) and all(isinstance(a, str) for a in cmd["argv"])
    return cmd if ok else None


def rerun_command(cmd: dict[str, Any], out: str | None = None) -> str:
    """The shell line that trains the recorded run again: `cd` to its working directory, the same
    arguments (under torchrun with as many processes when it had several), and with `out` as
    --out (a new folder: the old one already holds the run)."""
    argv = list(cmd["argv"])
    if out is not None:
        new: list[str] = []
        skip = False
        for a in argv:
            if skip:
                new.append(out)
                skip = False
            elif a == "--out":
                new.append(a)
                skip = True
            elif a.startswith("--out="):
                new.append(f"--out={out}")
            else:
                new.append(a)
        argv = new
    world = int(cmd.get("world_size", 1) or 1)
    if world > 1 and argv[:1] == ["instdisc"]:
        nodes = cmd.get("nodes")
        launch = ["--standalone", f"--nproc_per_node={world}"] if nodes == 1 else [
            f"--nnodes={nodes}", f"--nproc_per_node={world // nodes}"] if nodes else [f"--nproc_per_node={world}"]
        argv = ["torchrun", *launch, "-m", "instdisc", *argv[1:]]
    line = shlex.join(argv)
    return f"cd {shlex.quote(str(cmd['cwd']))} && {line}" if cmd.get("cwd") else line


def _out_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return None


def command_html(run: Path) -> str:
    """The "Command" section: the recorded command line and a copy-able line that reruns it."""
    cmd = read_command(run)
    if cmd is None:
        return ("<h2>Command</h2><p class='sub'>no command recorded: RUN_DIR/command.json is written by "
                "<code>instdisc train</code> and <code>instdisc demo</code> (runs made from Python or before "
                "it recorded commands have none); the configuration below is complete.</p>")
    out = _out_arg(cmd["argv"])
    rerun = rerun_command(cmd, (out.rstrip("/") + "-rerun") if out else None)
    when = html.escape(str(cmd.get("date", "")))
    procs = int(cmd.get("world_size", 1) or 1)
    nodes = cmd.get("nodes")
    how = (f", {procs} processes on {nodes} node(s)" if nodes else f", {procs} processes") if procs > 1 else ""
    if procs > 1 and nodes and nodes > 1:
        how += "; run the torchrun line on every node, with its rendezvous flags"
    resumed = (" This is the command of a later launch that continued the run (the first one was not recorded)."
               if cmd.get("resumed") else "")
    return (f"<h2>Command</h2><p class='sub'>the command that started this run ({when}{how}).{resumed}</p>"
            f"<pre class='cmd'>{html.escape(shlex.join(cmd['argv']))}</pre>"
            "<p class='sub'>to train it again into a new folder (copy and paste):</p>"
            f"<pre class='cmd'>{html.escape(rerun)}</pre>")


def _page(run: Path, cfg: dict[str, Any], records: list[dict[str, Any]], results: dict[str, dict[str, Any]],
          figures: list[str], notes: list[str], seconds: float) -> str:
    r = cfg.get("run", {})
    m = cfg.get("model", {})
    d = cfg.get("data", {})
    o = cfg.get("optim", {})
    data = str(d.get("data", "?"))
    if "/" in data or os.sep in data:  # a path: its last part names it, the full path is in the configuration
        data = Path(data).name
    title = f"{run.resolve().name}: {r.get('method', '?')} on {data}"
    epochs = [x for x in records if x.get("type") == "epoch"]
    finals = [x for x in records if x.get("type") == "final"]
    summary = {
        "method": r.get("method"), "backbone": f"{m.get('arch', '?')} width {m.get('width', '?')}",
        "data": d.get("data"), "epochs done": epochs[-1]["epoch"] if epochs else 0, "planned epochs": o.get("epochs"),
        "batch size": o.get("batch_size"), "seed": r.get("seed"),
    }
    if epochs and _num(epochs[-1].get("knn_top1")):
        summary["last kNN monitor top-1 %"] = float(epochs[-1]["knn_top1"])
    if finals:
        summary.update({f"final {k.replace('knn_', 'kNN ')} %": float(v) for k, v in finals[-1].items()
                        if k.startswith("knn") and _num(v)})
    charts, values = training_charts(records)
    if charts or values:
        training = (f"<div class='charts'>{''.join(charts)}</div>" if charts else "")
        if values:
            training += ("<h3>logged once or constant</h3>"
                         + _table(values, ["number", "value", "logged"], ["number", "value", "logged"]))
    else:
        training = "<p class='sub'>no metrics logged yet</p>"
    cfg_html = "".join(f"<h3>{html.escape(sec)}</h3>{_kv_table(vals)}" for sec, vals in cfg.items() if isinstance(vals, dict))
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_STATUS_JS}</script></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='sub'>report by instdisc {html.escape(__version__)} on "
        f"{time.strftime('%Y-%m-%d %H:%M')} ({format_number(seconds)} s)</p>",
        "".join(f"<div class='note'>{html.escape(n)}</div>" for n in notes),
        f"<h2>Summary</h2>{_kv_table(summary)}",
        command_html(run),
        "<h2>Training</h2>" + training,
        "<h2>Evaluation</h2>" + (evaluation_html(results) or "<p class='sub'>no evaluation results in eval/</p>"),
        "".join(figures),
        f"<h2>Configuration</h2>{cfg_html or '<p class=sub>no config.json</p>'}",
        "</body></html>",
    ]
    return "".join(parts)

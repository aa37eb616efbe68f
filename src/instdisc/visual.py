"""Pictures of what was learned: neighbour grids, a 2-D map of the embedding, line charts.

Everything is drawn with PIL (PNG) or written as SVG text, so nothing beyond the package's own
dependencies is needed; the report (report.py) inlines the results.

* `neighbour_grid`: one row per query, the query then its nearest training images by cosine
  similarity (NPID's retrieval figure: query + 20 retrievals), framed green where the labels
  agree with the query's and red where they do not.
* `embed_2d` + `scatter_map`: PCA (fast, deterministic) or t-SNE (scikit-learn) of the embedding,
  one colour per class, with a legend.
* `svg_line_chart`: a small self-contained SVG chart for training curves.
"""

from __future__ import annotations

import base64
import colorsys
import html
import io
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

AGREE = (34, 160, 70)
DISAGREE = (215, 45, 55)
QUERY = (40, 110, 220)
BACKGROUND = (255, 255, 255)
# The first ten are matplotlib's tab10 (colour-blind-aware, the usual look); more are spaced in hue.
_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """n distinguishable RGB colours."""
    out = [tuple(int(h[i : i + 2], 16) for i in (1, 3, 5)) for h in _TAB10[:n]]
    for j in range(len(out), n):
        r, g, b = colorsys.hsv_to_rgb((j * 0.618033988749895) % 1.0, 0.65 + 0.3 * (j % 2), 0.85 - 0.25 * (j % 3 == 0))
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out  # type: ignore[return-value]


# Text drawn into pictures: 12 px (Pillow's default is 10 px, too small to read beside a 64 px cell).
TEXT_PX = 12


def _font(size: int = TEXT_PX) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:  # older Pillow: its one bitmap font
        return ImageFont.load_default()


def format_number(v: object) -> str:
    """The one way the report writes a value: numbers by magnitude, everything else as plain text.

    Integers get thousands separators (12345 -> "12,345"); floats of 10,000 or more are rounded
    to integers the same way; floats from 1 to 10,000 get two decimals (97.2222 -> "97.22"); smaller
    ones four significant digits (0.001 -> "0.001", 0.0625 -> "0.0625") and below 1e-4 an exponent
    (3e-05 -> "3e-5"); 0 is "0". Strings are returned as they are (no JSON quotes), lists joined
    with ", ", None as "none" and booleans as "yes" / "no".
    """
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        x = float(v)
        if not math.isfinite(x):
            return str(x)
        a = abs(x)
        if a == 0:
            return "0"
        if a >= 1e15:
            return f"{x:.3e}".replace("e+", "e")
        if a >= 1e4:
            return f"{x:,.0f}"
        if a >= 1:
            return f"{x:,.2f}"
        if a >= 1e-4:
            return f"{x:.4g}"
        mant, exp = f"{x:.3g}".split("e")
        return f"{mant}e{int(exp)}"
    if isinstance(v, (list, tuple)):
        return ", ".join(format_number(x) for x in v)
    return str(v)


def _cell(img: np.ndarray, size: int) -> Image.Image:
    """(H, W, 3) uint8 -> size x size; small images are enlarged with nearest neighbour (sharp pixels)."""
    im = Image.fromarray(np.ascontiguousarray(img[..., :3]).astype(np.uint8), "RGB")
    if im.size == (size, size):
        return im
    small = max(im.size) < size
    return im.resize((size, size), Image.NEAREST if small else Image.BILINEAR)


def thumbnail(img: np.ndarray, size: int) -> Image.Image:
    """(H, W, 3) uint8 -> a size x size picture, as the grids draw each cell (`instdisc search`'s page)."""
    return _cell(img, size)


def neighbour_grid(
    queries: Sequence[np.ndarray],
    neighbours: Sequence[Sequence[np.ndarray]],
    agree: Sequence[Sequence[bool]],
    *,
    captions: Sequence[str] | None = None,
    sims: Sequence[Sequence[float]] | None = None,
    cell: int = 64,
    border: int = 3,
    gap: int = 4,
) -> Image.Image:
    """A grid: row r = query r (blue frame), a gap, then its neighbours (green/red frames).

    Args:
        queries: Q images (H, W, 3) uint8.
        neighbours: Q lists of K images, nearest first.
        agree: Q lists of K booleans: neighbour label == query label.
        captions: optional text under each query (e.g. its class name).
        sims: optional Q lists of K cosine similarities, written under each neighbour.
        cell: side of an image in pixels (borders are drawn inside it).
    """
    if len(queries) != len(neighbours) or len(queries) != len(agree):
        raise ValueError("queries, neighbours and agree must have one entry per query")
    k = max((len(n) for n in neighbours), default=0)
    font = _font()
    cap_h = TEXT_PX + 4 if captions or sims else 0
    row_h = cell + cap_h + gap
    width = gap + (cell + gap) * (k + 1) + gap
    height = gap + row_h * len(queries)
    out = Image.new("RGB", (width, max(height, 1)), BACKGROUND)
    draw = ImageDraw.Draw(out)

    def fit(text: str) -> str:  # cut to the cell's width, so a long class name never runs into the next cell
        while text and draw.textlength(text, font=font) > cell:
            text = text[:-1]
        return text

    def paste(img: np.ndarray, x: int, y: int, colour: tuple[int, int, int]) -> None:
        inner = cell - 2 * border
        out.paste(_cell(img, inner), (x + border, y + border))
        for b in range(border):
            draw.rectangle([x + b, y + b, x + cell - 1 - b, y + cell - 1 - b], outline=colour)

    for r, (q, ns, ag) in enumerate(zip(queries, neighbours, agree, strict=True)):
        y = gap + r * row_h
        paste(q, gap, y, QUERY)
        if captions:
            draw.text((gap, y + cell + 1), fit(captions[r]), fill=(30, 30, 30), font=font)
        for j, (n, a) in enumerate(zip(ns, ag, strict=True)):
            x = gap + (cell + gap) * (j + 1) + gap
            paste(n, x, y, AGREE if a else DISAGREE)
            if sims is not None:
                draw.text((x + 1, y + cell + 1), f"{float(sims[r][j]):.3f}", fill=(30, 30, 30), font=font)
    return out


# Up to this many points the 2-D map is a t-SNE, above it PCA. A good embedding's classes are
# separated along many directions, so its top two principal components show one mixed blob
# (digits at 98% kNN: all ten classes overlap in PCA, t-SNE separates them); t-SNE's cost grows
# with N (about a minute for 2,000 points on 2 CPU cores), PCA's stays under a second.
TSNE_MAX_POINTS = 5000


def map_method_for(n: int, method: str = "auto") -> Literal["pca", "tsne"]:
    """The 2-D map method for `n` points: `method` itself, or for "auto" t-SNE up to
    TSNE_MAX_POINTS points and PCA above."""
    if method == "auto":
        return "tsne" if n <= TSNE_MAX_POINTS else "pca"
    if method not in ("pca", "tsne"):
        raise ValueError(f"unknown 2-D map method {method!r}; choose auto, pca or tsne")
    return method  # type: ignore[return-value]


def embed_2d(
    feats: Tensor | np.ndarray, method: Literal["pca", "tsne"] = "pca", *, seed: int = 0
) -> np.ndarray:
    """(N, D) -> (N, 2): the top two principal components, or a t-SNE map (scikit-learn, PCA init).

    PCA takes well under a second for 10,000 points; t-SNE takes about a minute for 2,000 on a
    2-core CPU and shows clusters better.
    """
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got {tuple(x.shape)}")
    if method == "pca":
        xc = x - x.mean(0)
        _, _, v = torch.linalg.svd(xc, full_matrices=False)  # rows of v: principal directions
        comps = v[:2].t()  # (D, 2)
        if comps.shape[1] < 2:
            comps = torch.cat([comps, torch.zeros(comps.shape[0], 2 - comps.shape[1], dtype=comps.dtype)], 1)
        # Fix each component's sign (the largest loading positive) so the map does not flip between runs.
        comps = comps * torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
        return (xc @ comps).numpy()
    if method == "tsne":
        from sklearn.manifold import TSNE

        # t-SNE needs perplexity < N: a map of very few points gets the largest it allows
        perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3), x.shape[0] - 1))
        return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x.numpy())
    raise ValueError(f"unknown 2-D map method {method!r}; choose pca or tsne")


def scatter_map(
    xy: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    size: int = 640,
    point: int = 3,
    title: str = "",
) -> Image.Image:
    """Scatter plot of 2-D points coloured by label, with a legend column on the right."""
    xy = np.asarray(xy, dtype=np.float64)
    labels = np.asarray(labels)
    n_cls = int(labels.max()) + 1 if labels.size else 0
    names = list(class_names or [])[:n_cls] + [str(c) for c in range(len(class_names or []), n_cls)]
    colours = class_colours(max(n_cls, 1))
    legend_w = 150
    top = 24 if title else 8
    img = Image.new("RGB", (size + legend_w, size + top), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font()
    if title:
        draw.text((8, 5), title, fill=(20, 20, 20), font=font)
    margin = 12
    lo, hi = xy.min(0), xy.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    pix = margin + (xy - lo) / span * (size - 2 * margin)  # (N, 2)
    draw.rectangle([0, top, size - 1, top + size - 1], outline=(200, 200, 200))
    order = np.random.default_rng(0).permutation(len(xy))  # no class is always drawn on top
    for i in order:
        x, y = pix[i, 0], top + size - pix[i, 1]  # y grows downwards in images
        draw.ellipse([x - point, y - point, x + point, y + point], fill=colours[int(labels[i])])
    for c, name in enumerate(names):
        y = top + 8 + 16 * c
        if y > top + size - 16:
            draw.text((size + 10, y), f"... {n_cls - c} more", fill=(60, 60, 60), font=font)
            break
        draw.rectangle([size + 10, y + 2, size + 20, y + 12], fill=colours[c])
        draw.text((size + 26, y + 1), name[:20], fill=(30, 30, 30), font=font)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_data_uri(img: Image.Image) -> str:
    """A data: URI of the image as PNG, for inlining in HTML."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode("ascii")


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _tick_labels(ticks: list[float]) -> list[str]:
    """Axis labels: as many decimals as the tick step needs (3.166, 3.168, ... stay distinct, which
    `format_number`'s two decimals would merge), `format_number` for whole, huge or tiny values."""
    if len(ticks) < 2:
        return [format_number(int(t)) if float(t).is_integer() and abs(t) < 1e15 else format_number(t) for t in ticks]
    step = min(abs(b - a) for a, b in zip(ticks, ticks[1:], strict=False))
    if all(float(t).is_integer() for t in ticks) and max(abs(t) for t in ticks) < 1e15:
        return [format_number(int(t)) for t in ticks]
    if step < 1e-4 or max(abs(t) for t in ticks) >= 1e5:
        return [format_number(float(t)) for t in ticks]
    dec = max(0, -math.floor(math.log10(step) + 1e-9))
    dec += 0 if round(step * 10**dec, 6).is_integer() else 1  # a 2.5 x 10^k step needs one more
    return [f"{t:,.{dec}f}" for t in ticks]


def svg_line_chart(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str = "",
    ylabel: str = "",
    width: int = 520,
    height: int = 240,
) -> str:
    """An inline SVG line chart (one polyline per series, axes with ticks, a legend).

    Non-finite points are dropped. Returns the <svg> element as a string.
    """
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]  # ten: SeLa's paper runs have ten heads, one line each
    clean = {}
    for name, (xs, ys) in series.items():
        pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if math.isfinite(float(x)) and math.isfinite(float(y))]
        if pts:
            clean[name] = pts
    left, right, top, bottom = 56, 12, 26, 38
    pw, ph = width - left - right, height - top - bottom
    esc = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
             f'<text x="{left}" y="16" font-size="13" font-family="sans-serif" font-weight="bold">{esc(title)}</text>']
    if not clean:
        parts.append(f'<text x="{left}" y="{top + ph / 2}" font-size="12" font-family="sans-serif" fill="#888">no data</text></svg>')
        return "".join(parts)
    xs_all = [p[0] for pts in clean.values() for p in pts]
    ys_all = [p[1] for pts in clean.values() for p in pts]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-9, y1 + abs(y1) * 0.1 + 1e-9
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>')
    yt = _nice_ticks(y0, y1)
    for t, label in zip(yt, _tick_labels(yt), strict=True):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" font-size="10" text-anchor="end" '
                     f'font-family="sans-serif">{label}</text>')
    xt = _nice_ticks(x0, x1)
    for t, label in zip(xt, _tick_labels(xt), strict=True):
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle" '
                     f'font-family="sans-serif">{label}</text>')
    if xlabel:
        parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle" '
                     f'font-family="sans-serif">{esc(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text x="12" y="{top + ph / 2}" font-size="11" text-anchor="middle" font-family="sans-serif" '
                     f'transform="rotate(-90 12 {top + ph / 2})">{esc(ylabel)}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        c = colours[i % len(colours)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.6" points="{path}"/>')
        if len(pts) <= 40:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{c}"/>' for x, y in pts]
        if len(clean) > 1 or name:
            lx = left + pw - 120
            ly = top + 12 + 14 * i
            parts.append(f'<line x1="{lx}" x2="{lx + 14}" y1="{ly - 4}" y2="{ly - 4}" stroke="{c}" stroke-width="2"/>')
            parts.append(f'<text x="{lx + 18}" y="{ly}" font-size="10" font-family="sans-serif">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)

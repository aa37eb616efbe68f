"""Images/s per worker core: instdisc's large-image worker pipeline against a torchvision-style one.

Both run on the same synthetic ImageNet-like JPEGs, generated here (sizes and aspect ratios
spread as ImageNet's training set: most images about 500 x 375 or 375 x 500, a tail of larger
photos up to 1,600 px, and some panoramas and tall images up to 3:1; JPEG quality 90, about
100-200 KB a file). One process, one thread: the figure is what one DataLoader worker core
delivers.

* "torchvision-style" (re-typed with PIL, as the papers' loaders do): open -> convert("RGB") ->
  RandomResizedCrop(224) (torchvision's get_params, crop, bilinear resize) -> random horizontal
  flip -> float tensor (ToTensor).
* "instdisc": what a DataLoader worker runs per batch (`instdisc.loader.decode_crops`): header
  -> crop box on the whole image -> decode at the JPEG DCT scale the box allows -> antialiased
  resize of the box to 224 -> uint8 batch. The flip and the conversion to float happen on the
  device, batched, so they are not the worker's cost.
* "instdisc, prepared N": the same on a copy made by ``instdisc data prepare --max-side N``.

Repeats alternate the pipelines so that drift in machine speed hits all alike; the median repeat
is reported.

  python benchmarks/imagenet_loader.py --images 300 --repeats 3 --max-side 320 400 --json loader.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from instdisc.loader import crop_generator, decode_crops
from instdisc.prepare import prepare
from instdisc.sources import FileImageSet, open_source

SIZE = 224
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults


def imagenet_like_size(rng: random.Random) -> tuple[int, int]:
    """(width, height) drawn to resemble ImageNet's training images."""
    u = rng.random()
    if u < 0.78:  # the bulk: 500 px on the long side, 3:4 .. 4:3 (median 500 x 375)
        long, short = 500, rng.choice([375] * 5 + [333] * 2 + [400, 450, 500])
    elif u < 0.93:  # larger photos
        long = rng.randint(600, 1600)
        short = int(long * rng.uniform(0.66, 1.0))
    else:  # extremes: panoramas and tall images, up to 3:1
        long = rng.randint(400, 900)
        short = int(long / rng.uniform(1.6, 3.0))
    return (long, short) if rng.random() < 0.75 else (short, long)  # most are landscape


def natural_image(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour regions plus texture at several scales (JPEG sizes close to real photos)."""
    out = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 70.0), (16, 35.0), (64, 18.0)):
        gh, gw = max(2, h * cells // max(w, h)), max(2, w * cells // max(w, h))
        out += _upsample(rng.normal(0, amp, (gh, gw, 3)), w, h)
    out += rng.normal(0, 6, (h, w, 3))
    return np.clip(out + 120, 0, 255).astype(np.uint8)


def _upsample(a: np.ndarray, w: int, h: int) -> np.ndarray:
    chans = [np.asarray(Image.fromarray(a[..., c].astype(np.float32), mode="F").resize((w, h), Image.BICUBIC))
             for c in range(3)]
    return np.stack(chans, -1)


def make_folder(root: Path, n: int, seed: int) -> dict[str, Any]:
    """An ImageFolder of n JPEGs in 10 classes; returns size statistics."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    sizes, nbytes = [], []
    for i in range(n):
        w, h = imagenet_like_size(rng)
        d = root / "train" / f"n{i % 10:08d}"
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(natural_image(w, h, nrng)).save(buf, format="JPEG", quality=90)
        (d / f"img_{i:05d}.JPEG").write_bytes(buf.getvalue())
        sizes.append((w, h))
        nbytes.append(len(buf.getvalue()))
    ws, hs = np.array(sizes).T
    return {"images": n, "median_wh": [int(np.median(ws)), int(np.median(hs))],
            "aspect_w_over_h_min_max": [round(float((ws / hs).min()), 2), round(float((ws / hs).max()), 2)],
            "median_kb": round(float(np.median(nbytes)) / 1024, 1), "mean_kb": round(float(np.mean(nbytes)) / 1024, 1)}


# --- torchvision-style pipeline, re-typed -----------------------------------------------------


def get_params(rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params: ten tries at (area, log-uniform ratio), then the centre."""
    area = width * height
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(lo, hi))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def torchvision_style(paths: list[str], rng: random.Random) -> int:
    for p in paths:
        with open(p, "rb") as f:
            img = Image.open(f).convert("RGB")
        i, j, h, w = get_params(rng, *img.size)
        img = img.crop((j, i, j + w, i + h)).resize((SIZE, SIZE), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float().div(255)  # ToTensor
        assert x.shape == (3, SIZE, SIZE)
    return len(paths)


def instdisc_pipeline(images: FileImageSet, batch: int, step0: int) -> int:
    n = len(images)
    views = [(SIZE, SCALE, RATIO)]
    for k, s in enumerate(range(0, n - batch + 1, batch)):
        xs = decode_crops(images, torch.arange(s, s + batch), views, crop_generator(0, step0 + k, 0))
        assert xs[0].shape == (batch, SIZE, SIZE, 3)
    return n // batch * batch


def timed(fn) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=300, help="synthetic JPEGs to generate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=50, help="images per worker batch (instdisc)")
    ap.add_argument("--max-side", type=int, nargs="*", default=[320, 400],
                    help="longest side of each prepared copy to compare (none: skip)")
    ap.add_argument("--gpu-img-per-s", type=float, default=2750.0,
                    help="assumed ResNet-50 training speed of one GPU (H100, bf16: ~2,500-3,000 img/s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where to generate the images (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp) / "imagenet-like"
        t0 = time.perf_counter()
        stats = make_folder(root, args.images, args.seed)
        print(f"generated {stats} in {time.perf_counter() - t0:.1f} s")
        images = open_source(str(root), "train", stream=True, progress=False)
        assert isinstance(images, FileImageSet)
        paths = [images.path(i) for i in range(len(images))]
        prepared: dict[str, FileImageSet] = {}
        for side in args.max_side:
            dst = Path(tmp) / f"prepared-{side}"
            print(prepare(str(root), dst, max_side=side, workers=0, progress=False).format())
            copy = open_source(str(dst), "train", stream=True, progress=False)
            assert isinstance(copy, FileImageSet), "the copy must stay a streamed source for this comparison"
            prepared[f"instdisc_prepared_{side}"] = copy
            paths_all = [copy.path(i) for i in range(len(copy))]
            for p in paths_all:
                Path(p).read_bytes()
        for p in paths:  # warm the page cache for every pipeline alike
            Path(p).read_bytes()
        rates: dict[str, list[float]] = {"torchvision_style": [], "instdisc": [], **{k: [] for k in prepared}}
        rng = random.Random(args.seed)
        for r in range(args.repeats):
            rates["torchvision_style"].append(timed(lambda: torchvision_style(paths, rng)))
            rates["instdisc"].append(timed(lambda r=r: instdisc_pipeline(images, args.batch, 1000 * r)))
            for key, copy in prepared.items():
                rates[key].append(timed(lambda copy=copy, r=r: instdisc_pipeline(copy, args.batch, 1000 * r)))
            print({k: round(v[-1], 1) for k, v in rates.items() if v})
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "torch": torch.__version__, "data": stats, "repeats": args.repeats, "max_side": args.max_side,
        "img_per_s_per_core": {k: round(v, 1) for k, v in med.items()},
        "ratio_vs_torchvision_style": {k: round(v / med["torchvision_style"], 2) for k, v in med.items()},
        "cores_per_gpu": {k: round(args.gpu_img_per_s / v, 1) for k, v in med.items()},
        "assumed_gpu_img_per_s": args.gpu_img_per_s,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

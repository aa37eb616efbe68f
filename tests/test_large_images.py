"""Large images: crop boxes drawn on the whole image at decode time, with torchvision's
``RandomResizedCrop`` distribution; decoding only what the crop needs; the evaluation view.

The crop-box test compares `instdisc.augment.crop_boxes` with a slow, sequential re-typing of
torchvision's ``RandomResizedCrop.get_params`` (one image at a time, Python's random module),
statistically: two-sample Kolmogorov-Smirnov tests on the area fraction, the aspect ratio and the
position, and a two-proportion z-test on the fallback rate. The same comparison is shown to
reject a wrong distribution (uniform instead of log-uniform ratios), so it can fail.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instdisc.augment import CROP_UNIFORMS, AugmentConfig, augment, crop_boxes
from instdisc.loader import TrainLoader, crop_generator, crop_specs, decode_crops, eval_batches
from instdisc.sources import FileImageSet, open_source

N_DRAWS = 20_000
ALPHA = 1e-4  # per comparison; the draws are seeded, so a pass or a failure is reproducible
KS_C = math.sqrt(-0.5 * math.log(ALPHA / 2))  # KS critical value factor for ALPHA (asymptotic)
Z_MAX = 4.0  # two-proportion z bound for the fallback rate


def reference_get_params(
    rng: random.Random, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
    *, log_uniform: bool = True,
) -> tuple[int, int, int, int, bool]:
    """torchvision's RandomResizedCrop.get_params, one image at a time -> (top, left, h, w, fell_back).

    ``log_uniform=False`` draws the ratio uniformly instead: a deliberately wrong distribution.
    """
    area = height * width
    lo, hi = (math.log(ratio[0]), math.log(ratio[1])) if log_uniform else ratio
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        r = rng.uniform(lo, hi)
        aspect = math.exp(r) if log_uniform else r
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)  # randint(0, H - h + 1) in torch's half-open form
            left = rng.randint(0, width - w)
            return top, left, h, w, False
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, True


def reference_boxes(height: int, width: int, scale, ratio, n: int, seed: int, **kw) -> np.ndarray:
    rng = random.Random(seed)
    return np.array([reference_get_params(rng, height, width, scale, ratio, **kw) for _ in range(n)])


def our_boxes(height: int, width: int, scale, ratio, n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, CROP_UNIFORMS, generator=g, dtype=torch.float64)
    # Per-image sizes, as the DataLoader workers call it (a batch of images of any sizes).
    hs, ws = torch.full((n,), float(height)), torch.full((n,), float(width))
    b = crop_boxes(u, hs, ws, scale, ratio).numpy()
    return b


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    pooled = np.concatenate([a, b])
    fa = np.searchsorted(a, pooled, side="right") / len(a)
    fb = np.searchsorted(b, pooled, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def differences(ref: np.ndarray, ours: np.ndarray, height: int, width: int, fallback: np.ndarray) -> list[str]:
    """Every statistic on which two samples of boxes (top, left, h, w) disagree; [] if none."""
    crit = KS_C * math.sqrt((len(ref) + len(ours)) / (len(ref) * len(ours)))
    out = []
    stats = {
        "area fraction": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "aspect ratio": lambda b: b[:, 3] / b[:, 2],
        "centre row": lambda b: (b[:, 0] + b[:, 2] / 2) / height,
        "centre column": lambda b: (b[:, 1] + b[:, 3] / 2) / width,
        # Offset within its own valid range: uniform over 0 .. H - h for a drawn box.
        "top offset": lambda b: (b[:, 0] + 0.5) / (height - b[:, 2] + 1),
        "left offset": lambda b: (b[:, 1] + 0.5) / (width - b[:, 3] + 1),
    }
    for name, f in stats.items():
        d = ks_statistic(f(ref), f(ours))
        if d > crit:
            out.append(f"{name}: KS {d:.4f} > {crit:.4f}")
    # Fallback rate: ours is recognisable by its box (the fallback box is a fixed one).
    p_ref = fallback.mean()
    fb_box = ref[fallback][0] if fallback.any() else None
    ours_fb = (ours == fb_box).all(axis=1) if fb_box is not None else np.zeros(len(ours), bool)
    p_ours = ours_fb.mean()
    pooled = (fallback.sum() + ours_fb.sum()) / (len(ref) + len(ours))
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / len(ref) + 1 / len(ours)))
    if abs(p_ref - p_ours) / se > Z_MAX:
        out.append(f"fallback rate {p_ours:.4f} vs {p_ref:.4f}")
    return out


# (H, W): square, 4:3 landscape and portrait, 3:1 tall and wide.
SHAPES = [(300, 300), (300, 400), (400, 300), (900, 300), (300, 900)]


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 1.0)], ids=["simclr", "npid"])
@pytest.mark.parametrize("hw", SHAPES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_crop_boxes_follow_torchvision_get_params(hw, scale):
    h, w = hw
    ratio = (3 / 4, 4 / 3)
    ref = reference_boxes(h, w, scale, ratio, N_DRAWS, seed=1)
    ours = our_boxes(h, w, scale, ratio, N_DRAWS, seed=2)
    assert differences(ref[:, :4], ours, h, w, ref[:, 4].astype(bool)) == []
    # Every box inside the image, and the image's four edges are all reached.
    top, left, bh, bw = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    assert (top == 0).any() and (left == 0).any() and (top + bh == h).any() and (left + bw == w).any()


def test_fallback_rate_matches_where_it_is_common():
    # Large crops of a 3:1 image rarely fit with a ratio in [3/4, 4/3]: most draws fall back.
    h, w, scale, ratio = 300, 900, (0.3, 1.0), (3 / 4, 4 / 3)
    ref = reference_boxes(h, w, scale, ratio, N_DRAWS, seed=3)
    fallback = ref[:, 4].astype(bool)
    assert 0.2 < fallback.mean() < 0.9
    ours = our_boxes(h, w, scale, ratio, N_DRAWS, seed=4)
    assert differences(ref[:, :4], ours, h, w, fallback) == []
    assert (ours == np.array([0, 250, 300, 400])).all(axis=1).mean() > 0.2  # centred: (900 - 400) // 2


@pytest.mark.parametrize("hw", [(300, 400), (900, 300)], ids=["4:3", "3:1"])
def test_the_comparison_rejects_a_wrong_distribution(hw):
    # Uniform instead of log-uniform aspect ratios: the same comparison must see it.
    h, w = hw
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    wrong = reference_boxes(h, w, scale, ratio, N_DRAWS, seed=5, log_uniform=False)
    ours = our_boxes(h, w, scale, ratio, N_DRAWS, seed=6)
    found = differences(wrong[:, :4], ours, h, w, wrong[:, 4].astype(bool))
    assert any(f.startswith("aspect ratio") for f in found), found


def test_a_mixed_size_batch_gets_each_image_its_own_boxes():
    g = torch.Generator().manual_seed(7)
    u = torch.rand(64, CROP_UNIFORMS, generator=g, dtype=torch.float64)
    sizes = [(375, 500), (500, 375), (900, 300), (32, 32)] * 16
    hs = torch.tensor([float(s[0]) for s in sizes])
    ws = torch.tensor([float(s[1]) for s in sizes])
    batch = crop_boxes(u, hs, ws, (0.08, 1.0), (3 / 4, 4 / 3))
    for b, (h, w) in enumerate(sizes):
        assert torch.equal(batch[b], crop_boxes(u[b : b + 1], h, w, (0.08, 1.0), (3 / 4, 4 / 3))[0])


# ---------------------------------------------------------------------------------------------
# Decoding the crops
# ---------------------------------------------------------------------------------------------


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth image with some texture (JPEG-friendly, yet every region differs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / 23 + c) * np.cos(yy / 31 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg_bytes(a: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path):
    """A small ImageFolder of large JPEGs (train: 12 of three shapes; val: 4)."""
    shapes = [(240, 320), (320, 240), (120, 360)]
    for split, n in (("train", 12), ("val", 4)):
        for c in ("cat", "dog"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n // 2):
                h, w = shapes[i % 3]
                (d / f"{i:02d}.jpg").write_bytes(jpeg_bytes(photo(h, w, seed=i + 7 * (c == "dog"))))
    return tmp_path / "data"


def test_crops_use_dct_scaling_only_where_the_crop_stays_large(folder):
    images = open_source(str(folder), "train")
    assert isinstance(images, FileImageSet)
    data = images.read_bytes(0)
    full = Image.open(io.BytesIO(data)).convert("RGB")  # 320 x 240 (w x h)
    # A big box for a small output: decoded at 1/2 or less; pixels close to the full decode's.
    big, small = (10, 20, 200, 260), (50, 60, 90, 100)
    ours_big, ours_small = images.read_crops(0, data, [big, small], [48, 64])
    t, l, h, w = big
    ref_big = np.asarray(full.resize((48, 48), Image.BILINEAR, box=(l, t, l + w, t + h)))
    assert np.abs(ours_big.astype(int) - ref_big.astype(int)).mean() < 3.0
    # Only the whole-image box set the scale in that call; alone, the small box (90 px for a
    # 64 px output) forbids any reduction, so its pixels are exactly those of a full decode.
    (alone,) = images.read_crops(0, data, [small], [64])
    t, l, h, w = small
    ref_small = np.asarray(full.resize((64, 64), Image.BILINEAR, box=(l, t, l + w, t + h)))
    assert np.array_equal(alone, ref_small)
    assert np.array_equal(ours_small, alone)  # the same decode served both boxes


def test_evaluation_view_is_resize_256_centre_crop_224_scaled(folder):
    images = open_source(str(folder), "test")
    x = next(eval_batches(images, 2, workers=0, size=112))  # (2, 3, 112, 112)
    assert x.shape == (2, 3, 112, 112)
    # Re-typed torchvision: Resize(128) (112 * 256 / 224) then CenterCrop(112).
    img = Image.open(images.path(0)).convert("RGB")
    w, h = img.size
    nw, nh = (128, int(128 * h / w)) if w <= h else (int(128 * w / h), 128)
    r = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - 112) / 2)), int(round((nw - 112) / 2))
    ref = np.asarray(r.crop((left, top, left + 112, top + 112)))
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), ref)
    # Features (the kNN monitor, embed) are computed on that view.
    from instdisc.features import extract_features

    seen = []
    feats = extract_features(lambda v: seen.append(v.shape) or v.flatten(1)[:, :5], images, size=112, workers=0)
    assert feats.shape == (len(images), 5) and set(seen) == {(len(images), 3, 112, 112)}


def test_crops_of_grey_and_palette_images_are_rgb(tmp_path):
    d = tmp_path / "data" / "train" / "c"
    d.mkdir(parents=True)
    Image.fromarray(photo(120, 160)[..., 0]).save(d / "grey.jpg", quality=90)  # mode L
    Image.fromarray(photo(100, 90)).convert("P").save(d / "palette.png")
    Image.fromarray(photo(90, 130)).convert("CMYK").save(d / "cmyk.jpg")
    images = open_source(str(tmp_path / "data"), "train")
    assert isinstance(images, FileImageSet)
    g = crop_generator(0, 0, 0)
    (x,) = decode_crops(images, torch.arange(3), [(48, (0.2, 1.0), (3 / 4, 4 / 3))], g)
    assert x.shape == (3, 48, 48, 3) and x.dtype == torch.uint8
    grey = x[[i for i in range(3) if images.path(i).endswith("grey.jpg")][0]]
    assert torch.equal(grey[..., 0], grey[..., 1]) and torch.equal(grey[..., 1], grey[..., 2])


def test_loader_crops_each_view_from_the_whole_image_reproducibly(folder):
    images = open_source(str(folder), "train")
    views = [AugmentConfig(size=40, scale=(0.14, 1.0)), AugmentConfig(size=24, scale=(0.08, 0.14))]
    loader = TrainLoader(images, 4, seed=3, workers=0, views=[views[0], views[1], views[1]])
    assert loader.crops_at_decode
    first = list(loader.epoch(1))
    again = list(TrainLoader(images, 4, seed=3, workers=1, views=[views[0], views[1], views[1]]).epoch(1))
    assert len(first) == 3
    for (xs, idx), (ys, jdx) in zip(first, again, strict=True):
        assert torch.equal(idx, jdx)
        assert [tuple(x.shape) for x in xs] == [(4, 3, 40, 40), (4, 3, 24, 24), (4, 3, 24, 24)]
        assert all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))  # workers or not
    # A resumed epoch regenerates the crops of its later steps exactly.
    resumed = list(loader.epoch(1, start_step=2, first_step=1 * 3 + 2))
    assert all(torch.equal(x, y) for x, y in zip(resumed[0][0], first[2][0], strict=True))
    # The two small views of one step are independent draws.
    xs, idx = first[0]
    assert not torch.equal(xs[1], xs[2])
    # The boxes are those of crop_boxes on the stored sizes, drawn from the step's generator.
    g = crop_generator(3, 3, 0)
    direct = decode_crops(images, idx, crop_specs([views[0], views[1], views[1]]), g)
    assert all(torch.equal(d.permute(0, 3, 1, 2), x) for d, x in zip(direct, xs, strict=True))


def test_precropped_views_get_the_rest_of_the_recipe():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    cfg = AugmentConfig(size=16, flip_p=1.0, jitter_p=0.0, grayscale_p=0.0)
    out = augment(x, cfg, g1, cropped=True)
    # Every image mirrored, nothing cropped or resized.
    ref = augment(x.flip(-1), AugmentConfig(size=16, scale=(1, 1), ratio=(1, 1), flip_p=0.0, jitter_p=0.0,
                                            grayscale_p=0.0), g2)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="16x16"):
        augment(x, AugmentConfig(size=8), g1, cropped=True)


# ---------------------------------------------------------------------------------------------
# instdisc data prepare
# ---------------------------------------------------------------------------------------------


def test_prepare_shrinks_keeps_ratios_names_indices_and_labels(folder, tmp_path):
    from instdisc.cli import main
    from instdisc.prepare import MARKER

    small = folder / "train" / "cat" / "zz_small.png"  # within the limit: copied byte for byte
    Image.fromarray(photo(50, 70, seed=3)).save(small)
    big_png = folder / "train" / "dog" / "zz_big.png"  # resized, and still a PNG
    Image.fromarray(photo(200, 150, seed=4)).save(big_png)
    dst = tmp_path / "prepared"
    assert main(["data", "prepare", str(folder), str(dst), "--max-side", "100", "--workers", "0"]) == 0
    assert (dst / MARKER).is_file()
    for split in ("train", "test"):
        a, b = open_source(str(folder), split, in_memory=False), open_source(str(dst), split, in_memory=False)
        assert len(a) == len(b) and a.classes == b.classes and np.array_equal(a.labels, b.labels)
        for i in range(len(a)):
            pa, pb = Path(a.path(i)), Path(b.path(i))
            assert pa.relative_to(folder) == pb.relative_to(dst)  # same index -> same image
            wa, ha = Image.open(pa).size
            wb, hb = Image.open(pb).size
            assert max(wb, hb) == min(100, max(wa, ha))
            assert abs(wb / hb - wa / ha) < 0.02 * wa / ha + 1 / min(wb, hb)  # rounding of the short side
            assert Image.open(pb).format == Image.open(pa).format
    assert (dst / "train" / "cat" / "zz_small.png").read_bytes() == small.read_bytes()
    # Worker processes write the same bytes.
    dst2 = tmp_path / "prepared2"
    assert main(["data", "prepare", str(folder), str(dst2), "--max-side", "100", "--workers", "2"]) == 0
    for f in dst.rglob("*.*"):
        if f.name != MARKER:
            assert (dst2 / f.relative_to(dst)).read_bytes() == f.read_bytes()


def test_prepare_refuses_what_it_cannot_copy_faithfully(folder, tmp_path, capsys):
    import tarfile

    from instdisc.cli import main

    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "x").write_text("")
    assert main(["data", "prepare", str(folder), str(dst), "--max-side", "64"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["data", "prepare", "synthetic", str(tmp_path / "s"), "--max-side", "64"]) == 2
    assert main(["data", "prepare", str(folder), str(folder / "small"), "--max-side", "64"]) == 2
    assert "inside SRC" in capsys.readouterr().err and not (folder / "small").exists()
    assert main(["data", "prepare", str(folder), str(tmp_path / "z"), "--max-side", "0"]) == 2
    (folder / "train" / "cat" / "01.jpg").write_bytes(b"\xff\xd8not a jpeg")
    assert main(["data", "prepare", str(folder), str(tmp_path / "bad"), "--max-side", "64", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "01.jpg" in err and "cannot be read" in err
    # An archive with a top-level folder: the copy is a plain folder that lists the same.
    (folder / "train" / "cat" / "01.jpg").write_bytes(jpeg_bytes(photo(100, 100)))
    tar = tmp_path / "set.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(folder, arcname="imagenet-mini")
    assert main(["data", "prepare", str(tar), str(tmp_path / "fromtar"), "--max-side", "64", "--workers", "0"]) == 0
    a = open_source(str(tar), "train", in_memory=False)
    b = open_source(str(tmp_path / "fromtar"), "train", in_memory=False)
    assert len(a) == len(b) and np.array_equal(a.labels, b.labels)


# ---------------------------------------------------------------------------------------------
# The ImageNet presets start
# ---------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGENET_PRESETS = ["npid_imagenet", "npid_imagenet_softmax", "pic_imagenet", "sela_imagenet"]


def shrunk_method_flags(preset: dict) -> list[str]:
    """The preset's own size hyper-parameters (negatives, queue, clusters, label passes, embedding
    size: every int above 32, or int list entry) set to 4, so a 12-image folder can run them."""
    from instdisc.methods import METHODS

    fields = {f.name for f in __import__("dataclasses").fields(METHODS[preset["method"]].Config)}
    out: list[str] = []
    for k, v in preset.items():
        if k not in fields:
            continue
        if isinstance(v, int) and not isinstance(v, bool) and v > 32:
            out += [f"--{k.replace('_', '-')}", "4"]
        elif isinstance(v, list) and v and all(isinstance(x, int) for x in v) and max(v) > 32:
            out += [f"--{k.replace('_', '-')}", *["4"] * len(v)]
    return out


@pytest.mark.parametrize("name", IMAGENET_PRESETS)
def test_imagenet_presets_start_on_large_jpegs(name, folder, tmp_path):
    import json

    from instdisc.cli import main
    from instdisc.config import load_preset

    path = CONFIGS / f"{name}.yaml"
    header = "".join(ln for ln in path.read_text().splitlines(keepends=True) if ln.startswith("#"))
    assert "Cost" in header and "Usage" in header  # each preset says what it costs and how to run it
    preset = load_preset(path)
    assert preset["aug_size"] >= 160 and not preset["cifar_stem"]
    out = tmp_path / "run"
    # Width 16, not 4 or 8: torch 2.13's CPU kernels corrupt the heap in the backward pass of a
    # width-4/8 ResNet-18 (ImageNet stem) in channels_last at 224 px (seen at the base commit too).
    rc = main(["train", "--config", str(path), "--data", str(folder), "--out", str(out), "--arch", "resnet18",
               "--width", "16", "--batch-size", "4", "--max-steps", "2", "--workers", "0", "--device", "cpu",
               "--no-progress", "--knn-every", "0", "--knn-k", "3", "--log-every", "1",
               "--window", "0", "--stride", "0", *shrunk_method_flags(preset)])
    assert rc == 0
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)


def test_an_explicit_image_size_keeps_the_squared_images_everywhere(folder):
    # --image-size S: every image becomes an S x S square first, streamed or not, for training and
    # evaluation alike (the behaviour of in-memory sources); no decode-time crops.
    images = open_source(str(folder), "train", image_size=48)
    assert isinstance(images, FileImageSet) and not images.whole_images
    loader = TrainLoader(images, 4, seed=0, workers=0, views=[AugmentConfig(size=40)])
    assert not loader.crops_at_decode
    x, idx = next(loader.epoch(0))
    assert isinstance(x, torch.Tensor) and x.shape == (4, 3, 48, 48)
    assert torch.equal(x[0].permute(1, 2, 0), torch.from_numpy(images.read(int(idx[0]))))
    ev = next(eval_batches(images, 2, workers=0, size=40))
    assert ev.shape == (2, 3, 48, 48)  # as stored; preprocess then sizes it like an in-memory set

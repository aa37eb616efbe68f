"""Tests for instdisc.augment: parameter ranges, probabilities, exactness and reference checks."""

from __future__ import annotations

import colorsys
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from instdisc.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    adjust_hue,
    apply_params,
    augment,
    blur_kernel_size,
    hsv_to_rgb,
    identity_config,
    preprocess,
    rgb_to_grayscale,
    rgb_to_hsv,
    sample_params,
)

MEAN = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _denorm(y: torch.Tensor) -> torch.Tensor:
    """Undo CIFAR normalisation -> [0, 1] floats."""
    return y * STD + MEAN


def _cfg_only(size: int = 32, **kw: object) -> AugmentConfig:
    """identity_config(size) with some fields switched on."""
    cfg = identity_config(size)
    for k, v in kw.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def test_params_in_range_and_per_sample() -> None:
    cfg = AugmentConfig()  # NPID defaults
    B, H, W = 2000, 200, 160
    p = sample_params(B, H, W, cfg, _gen())
    top, left, h, w = p["crop"].double().unbind(1)
    assert p["crop"].dtype == torch.int64 and p["crop"].shape == (B, 4)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    assert (h >= 1).all() and (w >= 1).all()
    # Area fraction within `scale` and aspect within `ratio`, up to the rounding of w and h to
    # whole pixels (each off by at most 0.5 px).
    area = h * w / (H * W)
    area_tol = 0.5 * (h + w + 0.5) / (H * W)
    assert (area >= cfg.scale[0] - area_tol).all() and (area <= cfg.scale[1] + area_tol).all()
    aspect = w / h
    assert (aspect >= cfg.ratio[0] * (w - 0.5) / w * h / (h + 0.5) - 1e-9).all()
    assert (aspect <= cfg.ratio[1] * (w + 0.5) / w * h / (h - 0.5) + 1e-9).all()
    # The draws actually cover the ranges (not e.g. stuck at one end).
    assert area.min() < cfg.scale[0] + 0.05 and area.max() > 0.9
    assert aspect.min() < 0.8 and aspect.max() > 1.25

    jit = p["jitter"]
    assert jit.shape == (B, 4)
    for k, strength in enumerate((cfg.brightness, cfg.contrast, cfg.saturation)):
        assert (jit[:, k] >= 1 - strength).all() and (jit[:, k] <= 1 + strength).all()
        assert jit[:, k].min() < 1 - 0.9 * strength and jit[:, k].max() > 1 + 0.9 * strength
    assert (jit[:, 3].abs() <= cfg.hue).all() and jit[:, 3].abs().max() > 0.9 * cfg.hue
    sig = p["blur_sigma"]
    assert (sig >= cfg.blur_sigma[0]).all() and (sig <= cfg.blur_sigma[1]).all()

    # Per sample: the parameters differ across the batch.
    assert torch.unique(p["crop"], dim=0).shape[0] > 0.9 * B
    assert torch.unique(jit[:, 0]).numel() > 0.99 * B
    assert torch.unique(jit[:, 3]).numel() > 0.99 * B


def test_crop_fallback_is_centre_crop() -> None:
    # Aspect 2 at full area never fits a square image: all 10 tries fail -> torchvision's fallback
    # (full width, height = width / 2, centred).
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(2.0, 2.0))
    p = sample_params(16, 32, 32, cfg, _gen())
    assert (p["crop"] == torch.tensor([8, 0, 16, 32])).all()


def test_empirical_probabilities() -> None:
    cfg = AugmentConfig(flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.3, solarize_p=0.1)
    n = 20000
    p = sample_params(n, 32, 32, cfg, _gen(1))
    # 5 sigma of a binomial proportion at n = 20000 is < 0.018.
    for key, prob in [
        ("flip", 0.5),
        ("jitter_mask", 0.8),
        ("gray_mask", 0.2),
        ("blur_mask", 0.3),
        ("solarize_mask", 0.1),
    ]:
        assert p[key].dtype == torch.bool
        assert abs(p[key].float().mean().item() - prob) < 0.018, key
    # The masks are independent draws, not the same one thresholded differently.
    both = (p["gray_mask"] & p["blur_mask"]).float().mean().item()
    assert abs(both - 0.06) < 0.01


def test_params_are_moved_to_device() -> None:
    p = sample_params(4, 32, 32, AugmentConfig(), _gen(), device="cpu")
    assert all(v.device.type == "cpu" for v in p.values())


# ---------------------------------------------------------------------------------------------
# Exactness and geometry
# ---------------------------------------------------------------------------------------------


def test_identity_config_equals_preprocess_exactly() -> None:
    x = _images(8, 32, 32)
    y = augment(x, identity_config(32), _gen())
    assert y.dtype == torch.float32 and y.shape == (8, 3, 32, 32)
    assert torch.equal(y, preprocess(x))
    assert torch.equal(y, preprocess(x, 32))
    # Non-square input: ratio (1, 1) falls back to the centre square, like preprocess's centre crop.
    x2 = _images(4, 40, 32, seed=1)
    assert torch.equal(augment(x2, identity_config(32), _gen()), preprocess(x2, 32))
    # Other normalisation constants are honoured by both.
    cfg = identity_config(32, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(augment(x, cfg, _gen()), preprocess(x, 32, IMAGENET_MEAN, IMAGENET_STD))


def test_preprocess_values_and_resize() -> None:
    x = _images(2, 8, 8)
    expected = (x.float() / 255 - MEAN) / STD
    torch.testing.assert_close(preprocess(x), expected)
    # Shorter side resized to `size`, then centre crop; a constant image stays constant.
    flat = torch.full((2, 3, 48, 64), 200, dtype=torch.uint8)
    out = preprocess(flat, 24)
    assert out.shape == (2, 3, 24, 24)
    torch.testing.assert_close(_denorm(out), torch.full_like(out, 200 / 255), atol=1e-5, rtol=0)
    # Centre crop without resize picks the middle rows.
    tall = _images(1, 40, 32)
    torch.testing.assert_close(preprocess(tall, 32), preprocess(tall[:, :, 4:36, :]))


def test_flip_mirrors() -> None:
    x = _images(6, 32, 32, seed=3)  # random, hence asymmetric
    y = augment(x, _cfg_only(flip_p=1.0), _gen())
    assert torch.equal(y, preprocess(x).flip(-1))
    assert not torch.equal(y, preprocess(x))
    # Mixed batch: exactly the flagged images are mirrored (also through the resampling path).
    cfg = AugmentConfig(size=32, scale=(0.5, 0.5), ratio=(1.0, 1.0), flip_p=0.5, jitter_p=0.0,
                        grayscale_p=0.0)
    p = sample_params(6, 32, 32, cfg, _gen(4))
    assert 0 < int(p["flip"].sum()) < 6  # this seed gives a mix
    out = apply_params(x, p, cfg)
    p_noflip = dict(p, flip=torch.zeros_like(p["flip"]))
    ref = apply_params(x, p_noflip, cfg)
    for b in range(6):
        expect = ref[b].flip(-1) if p["flip"][b] else ref[b]
        torch.testing.assert_close(out[b], expect, atol=1e-5, rtol=0)


def _reference_crop(x: torch.Tensor, p: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Slow per-image reference: slice the crop box, F.interpolate it, mirror, normalise."""
    outs = []
    xf = x.float() / 255
    for b in range(x.shape[0]):
        t, l, h, w = (int(v) for v in p["crop"][b])
        patch = xf[b : b + 1, :, t : t + h, l : l + w]
        r = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False)
        if p["flip"][b]:
            r = r.flip(-1)
        outs.append(r)
    return (torch.cat(outs) - MEAN) / STD


@pytest.mark.parametrize(("h", "w", "size"), [(32, 32, 32), (48, 40, 24), (20, 28, 48)])
def test_crop_matches_per_image_reference(h: int, w: int, size: int) -> None:
    cfg = AugmentConfig(size=size, jitter_p=0.0, grayscale_p=0.0)  # default crop + flip
    x = _images(24, h, w, seed=5)
    p = sample_params(24, h, w, cfg, _gen(6))
    out = apply_params(x, p, cfg)
    assert out.shape == (24, 3, size, size)
    ref = _reference_crop(x, p, size)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_same_size_crops_are_exact_translations() -> None:
    # Area fraction 0.64 of 40x40 at aspect 1 is exactly a 32x32 box: pure random translations.
    cfg = AugmentConfig(size=32, scale=(0.64, 0.64), ratio=(1.0, 1.0), flip_p=0.5, jitter_p=0.0,
                        grayscale_p=0.0)
    x = _images(16, 40, 40, seed=7)
    p = sample_params(16, 40, 40, cfg, _gen(8))
    assert (p["crop"][:, 2:] == 32).all()
    assert torch.unique(p["crop"][:, :2], dim=0).shape[0] > 1
    out = apply_params(x, p, cfg)
    assert torch.equal(out, _reference_crop(x, p, 32))


def test_grayscale_equal_channels() -> None:
    x = _images(5, 32, 32, seed=9)
    y = _denorm(augment(x, _cfg_only(grayscale_p=1.0), _gen()))
    torch.testing.assert_close(y[:, 0], y[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[:, 1], y[:, 2], atol=1e-5, rtol=0)
    luma = rgb_to_grayscale(x.float() / 255)[:, 0]
    torch.testing.assert_close(y[:, 0], luma, atol=1e-5, rtol=0)
    # ITU-R 601-2 weights, as PIL's convert("L") and torchvision.
    primaries = torch.eye(3).view(3, 3, 1, 1)
    torch.testing.assert_close(rgb_to_grayscale(primaries).view(3), torch.tensor([0.2989, 0.587, 0.114]))
    # Mixed batch: only masked images are grey, the others bit-identical to the identity.
    cfg = _cfg_only(grayscale_p=0.5)
    p = sample_params(5, 32, 32, cfg, _gen(10))
    out = apply_params(x, p, cfg)
    plain = preprocess(x)
    for b in range(5):
        d = _denorm(out[b : b + 1])
        if p["gray_mask"][b]:
            torch.testing.assert_close(d[:, 0], d[:, 2], atol=1e-5, rtol=0)
        else:
            assert torch.equal(out[b], plain[b])


def test_seed_reproducibility() -> None:
    x = _images(16, 32, 32)
    cfg = AugmentConfig(blur_p=0.5, solarize_p=0.2)
    a = augment(x, cfg, _gen(123))
    b = augment(x, cfg, _gen(123))
    c = augment(x, cfg, _gen(124))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # Two views from one generator differ (the generator advances).
    g = _gen(5)
    assert not torch.allclose(augment(x, cfg, g), augment(x, cfg, g))


def test_non_square_inputs_and_other_sizes() -> None:
    for (h, w), size in [((24, 40), 32), ((40, 24), 16), ((17, 33), 64)]:
        x = _images(3, h, w)
        y = augment(x, AugmentConfig(size=size, blur_p=1.0, solarize_p=0.5), _gen())
        assert y.shape == (3, 3, size, size) and y.dtype == torch.float32
        assert torch.isfinite(y).all()
        assert y.requires_grad is False
    # Float input in [0, 1] is accepted and treated like uint8 / 255.
    x = _images(4, 32, 32)
    cfg = AugmentConfig()
    torch.testing.assert_close(augment(x.float() / 255, cfg, _gen(3)), augment(x, cfg, _gen(3)))


def test_outputs_stay_in_range() -> None:
    x = _images(64, 32, 32)
    cfg = AugmentConfig(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.5, jitter_p=1.0,
                        blur_p=0.5, solarize_p=0.5)
    y = _denorm(augment(x, cfg, _gen()))
    assert y.min() >= -1e-5 and y.max() <= 1 + 1e-5


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        augment(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), AugmentConfig())
    with pytest.raises(ValueError):
        augment(torch.zeros(3, 8, 8, dtype=torch.uint8), AugmentConfig())
    with pytest.raises(TypeError):
        augment(torch.zeros(2, 3, 8, 8, dtype=torch.int32), AugmentConfig())
    with pytest.raises(ValueError):
        AugmentConfig(scale=(0.9, 0.1))
    with pytest.raises(ValueError):
        AugmentConfig(hue=0.7)
    with pytest.raises(ValueError):
        AugmentConfig(flip_p=1.5)


# ---------------------------------------------------------------------------------------------
# Colour ops against closed forms / references
# ---------------------------------------------------------------------------------------------


def _jitter_with(x: torch.Tensor, **kw: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply colour jitter with only the given strengths (always applied); return out, factors."""
    cfg = _cfg_only(x.shape[-1], jitter_p=1.0, **kw)
    p = sample_params(x.shape[0], x.shape[2], x.shape[3], cfg, _gen(11))
    return _denorm(apply_params(x, p, cfg)), p["jitter"]


def test_brightness_contrast_saturation_closed_forms() -> None:
    x = _images(6, 16, 16, seed=12)
    xf = x.float() / 255

    out, f = _jitter_with(x, brightness=0.5)
    ref = (xf * f[:, 0].view(-1, 1, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)

    out, f = _jitter_with(x, contrast=0.5)
    m = rgb_to_grayscale(xf).mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    c = f[:, 1].view(-1, 1, 1, 1)
    torch.testing.assert_close(out, (c * xf + (1 - c) * m).clamp(0, 1), atol=2e-6, rtol=0)

    out, f = _jitter_with(x, saturation=0.5)
    s = f[:, 2].view(-1, 1, 1, 1)
    grey = rgb_to_grayscale(xf)
    torch.testing.assert_close(out, (s * xf + (1 - s) * grey).clamp(0, 1), atol=2e-6, rtol=0)
    assert (f[:, 2] != 1).all()  # the factors were really drawn


def test_hue_jitter_matches_hsv_reference() -> None:
    x = _images(4, 8, 8, seed=13)
    out, f = _jitter_with(x, hue=0.5)
    hsv = rgb_to_hsv(x.float() / 255)
    hsv[:, 0] = torch.remainder(hsv[:, 0] + f[:, 3].view(-1, 1, 1), 1.0)
    torch.testing.assert_close(out, hsv_to_rgb(hsv), atol=2e-6, rtol=0)


def test_rgb_hsv_against_colorsys_and_round_trip() -> None:
    g = _gen(14)
    x = torch.rand(3, 3, 8, 8, generator=g)
    # Include the edge cases: grey, black, white, pure and tied primaries.
    special = torch.tensor(
        [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1],
         [0.2, 0.7, 0.7]]
    )
    x[0, :, 0, :] = special.T
    hsv = rgb_to_hsv(x)
    assert hsv.min() >= 0 and hsv.max() <= 1 and (hsv[:, 0] < 1).all()
    flat = x.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    ref = torch.tensor([colorsys.rgb_to_hsv(*px) for px in flat])
    torch.testing.assert_close(hsv.permute(0, 2, 3, 1).reshape(-1, 3), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=1e-6, rtol=0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0, width=32), min_size=3, max_size=3),
    st.floats(-0.5, 0.5, width=32),
)
def test_adjust_hue_property(rgb: list[float], shift: float) -> None:
    x = torch.tensor(rgb).view(1, 3, 1, 1)
    # Shift by 0 is the identity; any shift preserves value (max) and chroma (max - min).
    torch.testing.assert_close(adjust_hue(x, torch.zeros(1)), x, atol=1e-6, rtol=0)
    y = adjust_hue(x, torch.tensor([shift]))
    assert abs(y.max() - x.max()) < 1e-6
    assert abs((y.max() - y.min()) - (x.max() - x.min())) < 1e-6
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    expect = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    torch.testing.assert_close(y.view(3), torch.tensor(expect), atol=1e-5, rtol=0)
    # Shifting by a full turn in two halves returns to the start.
    back = adjust_hue(adjust_hue(x, torch.tensor([0.5])), torch.tensor([0.5]))
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)


def test_blur_matches_conv_reference() -> None:
    assert blur_kernel_size(32) == 3 and blur_kernel_size(224) == 23 and blur_kernel_size(96) == 9
    x = _images(4, 40, 40, seed=15)
    cfg = AugmentConfig(size=40, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                        grayscale_p=0.0, blur_p=1.0)
    p = sample_params(4, 40, 40, cfg, _gen(16))
    out = _denorm(apply_params(x, p, cfg))
    k = blur_kernel_size(40)
    xf = x.float() / 255
    for b in range(4):
        sigma = float(p["blur_sigma"][b])
        t = torch.arange(k, dtype=torch.float32) - k // 2
        k1 = torch.exp(-(t**2) / (2 * sigma**2))
        k1 = k1 / k1.sum()
        k2 = torch.outer(k1, k1).expand(3, 1, k, k)
        ref = F.conv2d(F.pad(xf[b : b + 1], (k // 2,) * 4, mode="reflect"), k2, groups=3)
        torch.testing.assert_close(out[b : b + 1], ref, atol=1e-5, rtol=0)
    # A blur smooths: total variation drops.
    tv = lambda z: (z[..., 1:] - z[..., :-1]).abs().mean()  # noqa: E731
    assert tv(out) < tv(xf)


def test_solarize() -> None:
    x = _images(3, 16, 16, seed=17)
    y = _denorm(augment(x, _cfg_only(16, solarize_p=1.0), _gen()))
    xf = x.float() / 255
    torch.testing.assert_close(y, torch.where(xf >= 0.5, 1 - xf, xf), atol=2e-6, rtol=0)


def test_runs_under_no_grad_and_inference_mode() -> None:
    x = _images(4, 32, 32)
    results: dict[str, torch.Tensor] = {}

    def run() -> None:
        # A fresh thread has fresh (thread-local) scratch buffers: the first call creating them
        # under inference_mode must not break later calls outside it.
        with torch.inference_mode():
            results["inference"] = augment(x, AugmentConfig(), _gen())
        with torch.no_grad():
            results["no_grad"] = augment(x, AugmentConfig(), _gen())
        results["plain"] = augment(x, AugmentConfig(), _gen())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert set(results) == {"inference", "no_grad", "plain"}
    assert torch.equal(results["inference"], results["no_grad"])
    assert torch.equal(results["plain"], results["no_grad"])
    # Scratch buffers are reused across calls: earlier results must not alias them.
    a = augment(x, AugmentConfig(), _gen())
    c = augment(x, AugmentConfig(), _gen(1))
    assert torch.equal(a, results["plain"])
    assert not torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_cpu_generator() -> None:
    x = _images(32, 40, 36)
    cfg = AugmentConfig(blur_p=0.5, solarize_p=0.2)
    cpu = augment(x, cfg, _gen(7))
    gpu = augment(x.cuda(), cfg, _gen(7))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    # An on-device generator works too and is deterministic.
    g1 = torch.Generator(device="cuda").manual_seed(3)
    g2 = torch.Generator(device="cuda").manual_seed(3)
    assert torch.equal(augment(x.cuda(), cfg, g1), augment(x.cuda(), cfg, g2))


def test_aspect_ratio_is_log_uniform() -> None:
    # Sanity of the aspect-ratio sampling: log-uniform means the median aspect is the geometric
    # mean of the ratio bounds (1.0 for (3/4, 4/3)), not their arithmetic mean (~1.04).
    p = sample_params(20000, 512, 512, AugmentConfig(scale=(0.1, 0.2)), _gen(18))
    aspect = (p["crop"][:, 3].double() / p["crop"][:, 2].double()).median().item()
    assert abs(math.log(aspect)) < 0.02

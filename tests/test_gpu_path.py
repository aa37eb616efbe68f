"""The in-memory device path against the streamed DataLoader path, SGD kernels, and --time-limit.

Everything runs on CPU; the tests marked gpu repeat the device comparisons on CUDA where there is
one. Tolerances: the two data paths feed the same uint8 batches to the same code, so on one device
their batches, augmentations and losses are equal exactly (torch.equal), not approximately.
Across devices (CPU vs CUDA) the losses agree to a relative 1e-4 in fp32 (TF32 off) and 5e-2
under bf16 autocast; augmentation statistics across devices (different random streams) agree
within 5 standard errors of a two-sample z-test.
"""

from __future__ import annotations

import json
import math
import runpy
import warnings
from pathlib import Path

import pytest
import torch

from instdisc import runtime
from instdisc.augment import AugmentConfig, apply_params, augment, sample_params
from instdisc.cli import main
from instdisc.engine import build_method, step_seed
from instdisc.errors import ConfigError, InstdiscWarning
from instdisc.loader import TrainLoader, random_order
from instdisc.methods import resolve_config
from instdisc.runtime import StopRequest, build_optimizer, load_optimizer_state, make_sgd
from instdisc.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU tests cover the rest)")


@pytest.fixture(scope="module")
def images():
    return open_source("synthetic:96", "train")


def build(n: int, method: str = "npid", **kw):
    small = {"arch": "resnet18", "width": 8, **({"nce_k": 16} if method == "npid" else {})}
    cfg = resolve_config({**small, **kw}, {}, method)
    torch.manual_seed(0)
    return cfg, build_method(cfg, n)


def loaders(images, batch=16, **kw):
    mem = TrainLoader(images, batch, seed=3, workers=2, **kw)
    streamed = TrainLoader(images, batch, seed=3, workers=2, in_memory=False, **kw)
    assert mem.data is not None and streamed.data is None  # two different paths, really
    return mem, streamed


# ---------------------------------------------------------------------------------------------
# 1. the two data paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1])
def test_in_memory_and_streamed_paths_yield_identical_batches(images, rank):
    mem, streamed = loaders(images, rank=rank, world_size=2)
    a, b = list(mem.epoch(1, start_step=2)), list(streamed.epoch(1, start_step=2))
    assert len(a) == len(b) == len(images) // 16 - 2
    for (xa, ia), (xb, ib) in zip(a, b, strict=True):
        assert xa.dtype == torch.uint8 and xa.shape == (8, 3, 32, 32)
        assert torch.equal(xa, xb) and torch.equal(ia, ib)
        assert torch.equal(xa, torch.from_numpy(images.images[ia.numpy()]).permute(0, 3, 1, 2))
    # The order sliced on the device is the seeded CPU permutation: rank r's half of every batch.
    order = random_order(len(images), 3)(1).view(-1, 16)[2:, rank * 8 : rank * 8 + 8]
    assert torch.equal(torch.stack([i for _, i in a]), order)


def first_step_loss(method, loader, cfg, seed=5):
    """The engine's step 0 on `loader`: its first batch, the step's augmentation generator and seed."""
    x, idx = next(loader.epoch(0))
    s = step_seed(seed, 0, 0)
    torch.manual_seed(s)
    gen = torch.Generator(device=loader.device).manual_seed(s)
    views = [augment(x, vc, gen) for vc in method.views(cfg.aug)]
    return method(views, idx).loss


@pytest.mark.parametrize("kw", [dict(nce_k=16), dict(nce_k=0, nce_t=0.1)], ids=["nce16", "softmax"])
def test_same_loss_on_the_same_batch_by_either_path(images, kw):
    mem, streamed = loaders(images)
    losses = []
    for loader in (mem, streamed):
        cfg, m = build(len(images), **kw)
        losses.append(first_step_loss(m, loader, cfg))
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])  # exact on one device


def test_training_by_either_path_is_the_same_run(tmp_path):
    common = ["--data", "synthetic:96", "--width", "8", "--batch-size", "16", "--nce-k", "16", "--epochs", "1",
              "--max-steps", "4", "--log-every", "1", "--knn-every", "0", "--no-progress", "--device", "cpu",
              "--workers", "2"]
    runs = {}
    for name, flag in [("mem", "--in-memory"), ("streamed", "--no-in-memory")]:
        assert main(["train", "--method", "npid", "--out", str(tmp_path / name), *common, flag]) == 0
        ck = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
        steps = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (ck, [(r["step"], r["loss"], r["batch"]) for r in steps if r["type"] == "step"])
    (a, la), (b, lb) = runs["mem"], runs["streamed"]
    assert b["config"]["data"]["in_memory"] is False and len(la) == 4
    assert la == lb  # every step's loss and batch, exactly
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# ---------------------------------------------------------------------------------------------
# 2. augmentation statistics
# ---------------------------------------------------------------------------------------------


def aug_stats(loader, cfg: AugmentConfig, gen: torch.Generator, epochs: int = 2) -> dict[str, torch.Tensor]:
    """Per augmented image: channel means and stds (N, 3) of the normalised output, and whether it
    was flipped or grayscaled (N,). Drawn exactly as augment() draws them."""
    out: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "flip": [], "gray": []}
    for e in range(epochs):
        for x, _ in loader.epoch(e):
            p = sample_params(x.shape[0], x.shape[2], x.shape[3], cfg, gen, x.device)
            y = apply_params(x, p, cfg).double()  # (B, 3, S, S)
            out["mean"].append(y.mean((2, 3)).cpu())
            out["std"].append(y.std((2, 3)).cpu())
            out["flip"].append(p["flip"].double().cpu())
            out["gray"].append(p["gray_mask"].double().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def stat_mismatches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], sigmas: float = 5.0) -> list[str]:
    """Two-sample z-test of every statistic's mean (per channel for mean/std): the names that differ
    by more than `sigmas` standard errors."""
    bad = []
    for key in a:
        xa, xb = a[key], b[key]
        se = (xa.var(0) / len(xa) + xb.var(0) / len(xb)).sqrt().clamp(min=1e-12)
        z = ((xa.mean(0) - xb.mean(0)).abs() / se).reshape(-1)
        bad += [f"{key}[{i}] z={v:.1f}" for i, v in enumerate(z.tolist()) if v > sigmas]
    return bad


@pytest.fixture(scope="module")
def big_images():
    return open_source("synthetic:512", "train")


def test_augmentation_statistics_match_between_the_paths(big_images):
    cfg = AugmentConfig()
    mem, streamed = loaders(big_images, batch=128)
    a = aug_stats(mem, cfg, torch.Generator().manual_seed(0))
    b = aug_stats(streamed, cfg, torch.Generator().manual_seed(0))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    n = len(a["flip"])
    for key, p in [("flip", cfg.flip_p), ("gray", cfg.grayscale_p)]:
        assert abs(a[key].mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n), key


def test_the_statistics_comparison_tells_apart_what_differs(big_images):
    """What the cross-device test relies on: independent random streams pass, a changed recipe fails."""
    mem = TrainLoader(big_images, 128, seed=3)
    ref = aug_stats(mem, AugmentConfig(), torch.Generator().manual_seed(0))
    assert stat_mismatches(ref, aug_stats(mem, AugmentConfig(), torch.Generator().manual_seed(1))) == []
    more_gray = aug_stats(mem, AugmentConfig(grayscale_p=0.6), torch.Generator().manual_seed(1))
    assert any(m.startswith("gray") for m in stat_mismatches(ref, more_gray))
    no_flip = aug_stats(mem, AugmentConfig(flip_p=0.0), torch.Generator().manual_seed(1))
    assert any(m.startswith("flip") for m in stat_mismatches(ref, no_flip))


@pytest.mark.gpu
@needs_cuda
def test_cuda_device_path_matches_the_cpu_path(big_images):
    """On the GPU: the same uint8 batches, the same loss on the same batch, and augmentation drawn
    by the GPU's own generator (as the engine does) with the statistics of the CPU's."""
    dev = torch.device("cuda")
    cpu, gpu = TrainLoader(big_images, 128, seed=3), TrainLoader(big_images, 128, seed=3, device=dev)
    for (xa, ia), (xb, ib) in zip(cpu.epoch(0), gpu.epoch(0), strict=True):
        assert xb.device.type == "cuda" and torch.equal(xa, xb.cpu()) and torch.equal(ia, ib.cpu())
    a = aug_stats(cpu, AugmentConfig(), torch.Generator().manual_seed(0))
    b = aug_stats(gpu, AugmentConfig(), torch.Generator(device=dev).manual_seed(0))
    assert stat_mismatches(a, b) == []

    # Full softmax: no random negatives, so both devices compute the same function. Parameters and
    # augmentation parameters (CPU generator) are the same; only the kernels differ.
    cfg, m_cpu = build(len(big_images), nce_k=0, nce_t=0.1)
    _, m_gpu = build(len(big_images), nce_k=0, nce_t=0.1)
    m_gpu = m_gpu.to(dev)
    x, idx = next(cpu.epoch(0))
    views = [apply_params(x, sample_params(128, 32, 32, cfg.aug, torch.Generator().manual_seed(1)), cfg.aug)]
    ref = m_cpu(views, idx).loss
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        fp32 = m_gpu([views[0].to(dev)], idx.to(dev)).loss
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert abs(fp32.item() - ref.item()) <= 1e-4 * abs(ref.item())
    _, m_bf16 = build(len(big_images), nce_k=0, nce_t=0.1)
    m_bf16 = m_bf16.to(dev, memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = m_bf16([views[0].to(dev).contiguous(memory_format=torch.channels_last)], idx.to(dev)).loss
    assert abs(bf16.item() - ref.item()) <= 5e-2 * abs(ref.item())


# ---------------------------------------------------------------------------------------------
# 3. SGD kernels
# ---------------------------------------------------------------------------------------------


def fused_available() -> bool:
    try:
        make_sgd([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9, weight_decay=0.0, impl="fused")
    except ConfigError:
        return False
    return True


def test_sgd_kernels_give_the_same_parameters(images):
    impls = ["plain", "foreach", *(["fused"] if fused_available() else [])]
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    results = {}
    for impl in impls:
        cfg, m = build(len(images), nce_k=0, nce_t=0.1)
        opt = build_optimizer(m, lr=0.1, momentum=0.9, weight_decay=5e-4, impl=impl)
        group = opt.param_groups[0]
        assert (bool(group.get("foreach")), bool(group.get("fused"))) == (impl == "foreach", impl == "fused")
        for step in range(3):
            views = [apply_params(x, sample_params(8, 32, 32, cfg.aug, torch.Generator().manual_seed(step)), cfg.aug)]
            loss = m(views, torch.arange(8) + 8 * step).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[impl] = (m.state_dict(), [opt.state[p].get("momentum_buffer") for p in m.parameters()])
    start = build(len(images), nce_k=0, nce_t=0.1)[1].state_dict()
    (ref, ref_mom) = results["plain"]
    assert any(not torch.equal(ref[k], start[k]) for k in ref)  # the steps moved the weights
    for impl in impls[1:]:
        sd, mom = results[impl]
        for k in ref:
            torch.testing.assert_close(sd[k], ref[k], rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"{impl}: {k}")
        assert sum(b is not None for b in ref_mom) > 0
        for a, b in zip(mom, ref_mom, strict=True):
            assert (a is None) == (b is None)
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_choice_reaches_only_methods_that_take_it(images):
    n = len(images)
    _, npid = build(n)
    assert build_optimizer(npid, lr=0.1, momentum=0.9, weight_decay=0.0, impl="foreach").param_groups[0]["foreach"]
    _, pic = build(n, method="pic", queue_size=16, dim=16, small_crops=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = build_optimizer(pic, lr=0.1, momentum=0.9, weight_decay=0.0)  # as before: no warning
    with pytest.warns(InstdiscWarning, match="--optimizer-impl foreach is ignored"):
        chosen = build_optimizer(pic, lr=0.1, momentum=0.9, weight_decay=0.0, impl="foreach")
    assert type(auto) is type(chosen) and type(chosen).__name__ == "SampledRowSGD"
    with pytest.raises(ConfigError, match="optimizer-impl"):
        build_optimizer(npid, lr=0.1, momentum=0.9, weight_decay=0.0, impl="turbo")


def test_resume_keeps_the_requested_kernels():
    p = torch.nn.Parameter(torch.ones(3))
    old = make_sgd([p], lr=0.1, momentum=0.9, weight_decay=0.0, impl="plain")
    p.grad = torch.ones(3)
    old.step()
    state = old.state_dict()
    naive = make_sgd([p], lr=0.1, momentum=0.9, weight_decay=0.0, impl="foreach")
    naive.load_state_dict(state)
    assert naive.param_groups[0]["foreach"] is False  # torch restores the checkpoint's flags...
    new = make_sgd([p], lr=0.1, momentum=0.9, weight_decay=0.0, impl="foreach")
    load_optimizer_state(new, state)
    assert new.param_groups[0]["foreach"] is True  # ...this keeps the run's own choice
    assert torch.equal(new.state[p]["momentum_buffer"], old.state[p]["momentum_buffer"])


# ---------------------------------------------------------------------------------------------
# 4. --time-limit: chaining a run into fixed-length commands
# (--max-steps then --resume equals one run: test_cli.py::test_resume_mid_epoch_is_bit_identical)
# ---------------------------------------------------------------------------------------------

CHAIN = ["--method", "npid", "--data", "synthetic:96", "--width", "8", "--batch-size", "16", "--nce-k", "16",
         "--epochs", "2", "--milestones", "1", "--log-every", "1", "--knn-every", "0", "--knn-k", "5",
         "--no-progress", "--device", "cpu"]


def test_time_limit_checkpoints_exits_0_and_resume_continues_the_same_run(tmp_path, monkeypatch, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--out", str(full), *CHAIN]) == 0
    ticks = iter(range(10**6))
    monkeypatch.setattr(runtime, "_now", lambda: 20.0 * next(ticks))  # 20 s per look at the clock
    # The clock starts at 0 and is read once after every step: 60 s are reached after step 3.
    assert main(["train", "--out", str(part), *CHAIN, "--time-limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "--time-limit 1 min reached" in out and f"--out {part} --resume" in out
    ck = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert {k: ck["state"][k] for k in ("epoch", "epoch_step", "step", "skipped")} == {
        "epoch": 0, "epoch_step": 3, "step": 3, "skipped": 0}
    monkeypatch.undo()  # the real clock: the stored 1-minute limit is not reached again
    assert main(["train", "--out", str(part), "--method", "npid", "--resume", "--no-progress", "--device", "cpu"]) == 0
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert a["state"] == b["state"] and a["state"]["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    def losses(run):
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["batch"]) for r in recs if r["type"] == "step"]

    assert losses(full) == losses(part) and len(losses(full)) == 12


def test_time_limit_clock(monkeypatch):
    readings = iter([0.0, 30.0, 59.9, 60.0, 0.0])
    monkeypatch.setattr(runtime, "_now", lambda: next(readings))
    t = StopRequest(1)  # reads 0.0 as its start
    assert [t.check(), t.check(), t.check()] == [False, False, True]
    assert t.check() is True  # sticky: no further reading, even if the clock went back
    assert next(readings) == 0.0
    reads = []
    monkeypatch.setattr(runtime, "_now", lambda: reads.append(1) or 1e9)
    unlimited = StopRequest(0)
    assert [unlimited.check(), unlimited.check()] == [False, False] and len(reads) == 1  # 0 = no limit


@pytest.mark.parametrize("bad", ["-1", "nan", "inf"])
def test_bad_time_limit_is_a_config_error(tmp_path, capsys, bad):
    assert main(["train", "--out", str(tmp_path / "r"), *CHAIN, "--time-limit", bad]) == 2
    assert "--time-limit" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 5. the benchmarks run on CPU with tiny settings
# ---------------------------------------------------------------------------------------------


def test_loader_throughput_benchmark_runs_on_cpu(tmp_path):
    bench = runpy.run_path(str(ROOT / "benchmarks" / "loader_throughput.py"))
    out = tmp_path / "tp.json"
    bench["main"](["--data", "synthetic:256", "--set", "nce_k=16", "--width", "4", "--batch-size", "32", "--steps", "3",
                   "--repeats", "1", "--workers", "1", "--device", "cpu", "--json", str(out)])
    res = json.loads(out.read_text())
    for path in ("in_memory", "streamed"):
        assert res[path]["train_img_per_s"] > 0 and res[path]["loader_img_per_s"] > 0
    assert res["device"] == "cpu" and res["batch_size"] == 32


def test_gpu_cifar10_benchmark_runs_on_cpu(tmp_path):
    bench = runpy.run_path(str(ROOT / "benchmarks" / "gpu_cifar10.py"))
    out = tmp_path / "res.json"
    rc = bench["main"](["--config", str(ROOT / "configs" / "npid_cifar10.yaml"), "--data", "synthetic:128",
                        "--out", str(tmp_path / "run"), "--json", str(out), "--epochs", "1", "--width", "4",
                        "--batch-size", "32", "--nce-k", "16", "--device", "cpu", "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["preset"].endswith("npid_cifar10.yaml") and res["epochs"] == 1 and res["epochs_done"] == 1
    assert res["complete"] is True and res["knn_k"] == 200 and res["test_images"] > 0
    assert 0 <= res["knn_top1"] <= res["knn_top5"] <= 100
    assert res["train_img_per_s"] > 0 and res["wall_s"] > 0 and res["peak_memory_mib"] > 0
    assert res["device"] == "cpu" and res["torch"] == torch.__version__

"""Label-free quality signals (instdisc.quality): each against a slow reference written from its
paper's formula, the cases with known answers (collapse, spread), and the training loop's use of
them (logged without labels, resumed exactly)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instdisc.cli import main
from instdisc.quality import (
    QualityState,
    alignment,
    neighbour_agreement,
    neighbour_indices,
    quality_signals,
    rankme,
    subset_indices,
    uniformity,
)


def unit(m: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(m, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_alignment_matches_the_pairwise_definition():
    z1, z2 = unit(50, 8, 0), unit(50, 8, 1)
    for alpha in (1.0, 2.0):
        ref = sum(float(torch.dot(a - b, a - b)) ** (alpha / 2) for a, b in zip(z1, z2, strict=True)) / 50
        assert alignment(z1, z2, alpha) == pytest.approx(ref, rel=1e-5)
    assert alignment(z1, z1) == 0.0
    assert alignment(z1, -z1) == pytest.approx(4.0)  # antipodal views: the largest it can be


def test_uniformity_matches_the_pairwise_definition():
    z = unit(30, 5)
    for t in (0.5, 2.0, 40.0):  # 40: the naive mean of exponentials underflows; the log-domain one does not
        terms = [math.exp(-t * float(torch.dot(z[i] - z[j], z[i] - z[j])))
                 for i, j in itertools.permutations(range(30), 2)]
        ref = math.log(sum(terms) / len(terms)) if min(terms) > 0 else None
        got = uniformity(z, t)
        if ref is not None:
            assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
        assert math.isfinite(got)
    collapsed = unit(1, 5).expand(30, 5)
    assert uniformity(collapsed) == pytest.approx(0.0, abs=1e-6)
    # Spread over a 256-d sphere: pairwise squared distances concentrate at 2, so about -2t.
    assert uniformity(unit(500, 256)) == pytest.approx(-4.0, abs=0.15)
    assert uniformity(unit(500, 256)) < uniformity(unit(500, 4))


def test_rankme_matches_numpy_and_its_bounds():
    z = unit(64, 16).numpy().astype(np.float64)
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(torch.from_numpy(z)) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-6)
    assert rankme(unit(1, 16).expand(64, 16)) == pytest.approx(1.0, abs=1e-3)  # collapse: rank 1
    eye = torch.eye(16)
    assert rankme(eye) == pytest.approx(16.0, rel=1e-4)  # equal singular values: full rank
    # Rows confined to a 3-d subspace of 16: effective rank at most 3.
    low = F.normalize(torch.randn(64, 3) @ torch.randn(3, 16), dim=1)
    assert 1.5 < rankme(low) <= 3.0 + 1e-4


def test_neighbour_indices_match_a_sort_and_exclude_self():
    z = unit(40, 6)
    got = neighbour_indices(z, 5)
    sims = (z @ z.T).numpy()
    for i in range(40):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:5]
        assert got[i].tolist() == order
    with pytest.raises(ValueError):
        neighbour_indices(z, 40)


def test_neighbour_agreement_counts_shared_neighbours():
    a = torch.tensor([[1, 2, 3], [0, 2, 3]])
    assert neighbour_agreement(a, a) == 1.0
    assert neighbour_agreement(a, a.flip(1)) == 1.0  # sets, not rankings
    b = torch.tensor([[1, 4, 5], [4, 5, 6]])
    assert neighbour_agreement(a, b) == pytest.approx(1 / 6)
    # A reordering of the images' embeddings that keeps each image's own vector: unchanged.
    z = unit(30, 4)
    s = QualityState()
    quality_signals(z, z, z, s)
    out = quality_signals(z.clone(), z, z, s)
    assert out["nn_agree"] == 1.0
    # Unrelated embeddings of the same images: about k / (M - 1).
    s = QualityState()
    quality_signals(unit(400, 16, 1), z[:1].expand(400, 4), z[:1].expand(400, 4), s)
    assert quality_signals(unit(400, 16, 2), z[:1].expand(400, 4), z[:1].expand(400, 4), s)["nn_agree"] < 0.1


def test_subset_is_fixed_by_the_seed_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a, b = subset_indices(1000, 50, seed=3), subset_indices(1000, 50, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and len(set(a.tolist())) == 50 and torch.all(a[1:] > a[:-1])
    assert not torch.equal(a, subset_indices(1000, 50, seed=4))
    assert torch.equal(subset_indices(10, 50, seed=0), torch.arange(10))


def epoch_lines(run):
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["type"] == "epoch"]


TINY = ["--arch", "resnet18", "--width", "4", "--aug-size", "16", "--batch-size", "64", "--no-progress",
        "--knn-every", "1", "--quality-subset", "300", "--lr", "0.05", "--schedule", "cosine"]


def test_training_logs_the_signals_without_labels_and_resume_repeats_them(tmp_path, one_thread):
    # An unlabelled folder: no kNN monitor is possible, the label-free signals still are.
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i in range(320):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = ["train", "--method", "npid", "--data", str(folder), "--epochs", "3", *TINY]
    assert main([*args, "--out", str(ref)]) == 0
    lines = epoch_lines(ref)
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert all("knn_top1" not in r for r in lines)
    for r in lines:
        assert 0 <= r["align"] <= 4 and r["uniform"] <= 0 and 1 <= r["rankme"] <= 128
    assert "nn_agree" not in lines[0] and all(0 <= r["nn_agree"] <= 1 for r in lines[1:])
    # Stopped after epoch 2 and resumed: epoch 3's numbers, nn_agree included (it compares with
    # epoch 2's neighbours, kept in the checkpoint), are the uninterrupted run's.
    assert main([*args, "--out", str(run), "--max-steps", str(2 * lines[0]["step"])]) == 0
    assert main([*args, "--out", str(run), "--resume"]) == 0
    keys = ("align", "uniform", "rankme", "nn_agree", "loss")
    assert [[r[k] for k in keys] for r in epoch_lines(run)[1:]] == [[r[k] for k in keys] for r in lines[1:]]


def test_quality_subset_zero_switches_them_off(tmp_path):
    run = tmp_path / "off"
    assert main(["train", "--method", "npid", "--data", "synthetic:200", "--epochs", "1", *TINY,
                 "--quality-subset", "0", "--out", str(run)]) == 0
    assert all("rankme" not in r for r in epoch_lines(run))


def test_the_signals_do_not_change_training(tmp_path, one_thread):
    # Their augmentations have their own generator and the model is measured in eval mode: the
    # weights, the bank and every step's loss are those of a run without them.
    runs = {}
    for q in ("0", "150"):
        runs[q] = tmp_path / f"q{q}"
        assert main(["train", "--method", "npid", "--data", "synthetic:200", "--epochs", "2", *TINY,
                     "--quality-subset", q, "--log-every", "1", "--out", str(runs[q])]) == 0
    a, b = (torch.load(runs[q] / "checkpoints" / "last.pt", weights_only=True) for q in ("0", "150"))
    assert a["model"].keys() == b["model"].keys()
    same = [torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())  # log_z may be unset (NaN)
            for x, y in ((a["model"][k].float(), b["model"][k].float()) for k in a["model"])]
    assert all(same) and len(same) > 100
    losses = [[r["loss"] for r in json.loads("[" + ",".join((run / "metrics.jsonl").read_text().splitlines()) + "]")
               if r["type"] == "step"] for run in runs.values()]
    assert losses[0] == losses[1] and len(losses[0]) >= 4
    assert "rankme" in epoch_lines(runs["150"])[-1] and "rankme" not in epoch_lines(runs["0"])[-1]


def test_by_default_the_signals_are_on_with_a_subset_chosen_for_n(tmp_path, capsys, one_thread):
    run = tmp_path / "default"
    args = [a for a in TINY if a not in ("--quality-subset", "300")]
    assert main(["train", "--method", "npid", "--data", "synthetic:200", "--epochs", "1", *args, "--out", str(run)]) == 0
    assert "--quality-subset 200 (N // 20 within [256, 2000], at most N)" in capsys.readouterr().out  # capped at N
    assert json.loads((run / "config.json").read_text())["run"]["quality_subset"] == 200
    assert "rankme" in epoch_lines(run)[-1]

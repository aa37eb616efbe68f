"""The offline demo: NPID on scikit-learn's handwritten digits, on CPU, in under three minutes.

It trains a narrow CIFAR-style ResNet-18 with NPID's full softmax over a memory bank of the 1,437
training digits (upsampled to 16x16), then compares kNN on the 360 held-out digits for the
learned features and for the same network at its random initialisation, under NPID's protocol
(weighted kNN, k = 200, weights exp(s/0.07)) and under plain 1-NN. No download: the digits ship
with scikit-learn.

How to read the two rows: at random initialisation all digits map to nearly the same direction
(cosine similarities around 0.98 +- 0.01), so the exp(s/t) weights barely separate near from far
neighbours and the 200-neighbour vote blurs; the learned embedding spreads the images over the
sphere, which is what the weighted vote measures. The nearest single neighbour is already right
~95% of the time at random initialisation, because raw-pixel similarity is a strong classifier on
digits; 1-NN is printed so that nobody mistakes the first row for more than it is.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from instdisc import dist
from instdisc.engine import fit, open_sets
from instdisc.evaluate import knn_evaluate, knn_row, subject_of
from instdisc.methods import Method, build_method, load_run, resolve_config
from instdisc.report import record_command

# Chosen for a 2-core CPU (evidence: docs/benchmarks.md). The 8x8 digits are stored at 16x16,
# not 32x32: 4x fewer pixels buy 4x more steps, and NPID needs steps (each image is seen ~60 times).
DEMO_PRESET = {
    "data": "digits",
    "image_size": 16,
    "aug_size": 16,
    "arch": "resnet18",
    "width": 16,
    "epochs": 60,
    "batch_size": 32,
    "lr": 0.03,
    "schedule": "cosine",
    "weight_decay": 5e-4,
    "nce_k": 0,  # 1,437 images: the full softmax over the bank is cheap and the paper's best
    "nce_t": 0.1,
    "bank_init": "features",  # start the bank from the network's own features (+2 points here)
    # kNN: the project's defaults, NPID's protocol (k = 200, t = 0.07).
    "knn_every": 10,
    # Digits are not mirror-symmetric and are small: no flips, milder crops.
    "aug_flip_p": 0.0,
    "aug_scale": [0.4, 1.0],
    "device": "cpu",
}


def _knn_rows(method: Method, cfg, train, test, device) -> dict[str, float]:  # noqa: ANN001
    """Weighted kNN at the run's (k, t) and 1-NN, on features recomputed with the eval transform
    (`instdisc.evaluate.knn_evaluate`, as every evaluation; one neighbour search for both)."""
    k, t = cfg.run.knn_k, cfg.run.knn_t
    rows = knn_evaluate(subject_of(method, cfg, device), train, test, ks=(k, 1), ts=(t,))
    return {"weighted": knn_row(rows, k, t)["top1"], "nn1": knn_row(rows, 1, t)["top1"]}


def _is_demo_run(out: str, cfg) -> bool:  # noqa: ANN001
    """True when `out` holds an earlier demo (same recipe, any number of epochs): replacing it is
    what running the demo again means. Any other run there is someone's work."""
    path = Path(out) / "config.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    new = cfg.to_dict()
    if not isinstance(old, dict):
        return False
    for d in (old, new):
        d.get("optim", {}).pop("epochs", None)
        d.get("run", {}).pop("out", None)
    # Values left unset here are chosen for N when training starts (--quality-subset, ...): the
    # saved run holds what was chosen for the same data.
    for sec, values in new.items():
        for k in [k for k, v in values.items() if v is None] if isinstance(values, dict) else []:
            values.pop(k)
            if isinstance(old.get(sec), dict):
                old[sec].pop(k, None)
    return old == new


def run_demo(out: str = "runs/demo", epochs: int | None = None, overwrite: bool = False) -> dict[str, float]:
    """Train the demo into `out` and print learned vs random kNN. An earlier demo in `out` is
    replaced; another run is refused (as `train` refuses it) unless `overwrite`."""
    preset = dict(DEMO_PRESET, out=out)
    if epochs is not None:
        preset["epochs"] = epochs
    cfg = resolve_config(preset, {}, "npid")
    argv = ["--out", out, *(["--epochs", str(epochs)] if epochs is not None else []), *(["--overwrite"] if overwrite else [])]
    overwrite = overwrite or _is_demo_run(out, cfg)
    env = dist.Env()
    train, test = open_sets(cfg)
    assert test is not None
    # The same network (same seed) before any training, evaluated the same way.
    torch.manual_seed(cfg.run.seed)
    rand = _knn_rows(build_method(cfg, len(train)).to(env.device), cfg, train, test, env.device)

    t0 = time.perf_counter()
    metrics = fit(cfg, env, overwrite=overwrite)
    record_command(out, argv, command="demo")  # the report's Command section: `instdisc demo --out ...`
    if metrics.get("stopped"):  # SIGTERM / Ctrl-C: a half-trained model is not "NPID (N epochs)"
        print(f"instdisc: the demo stopped before its {cfg.optim.epochs} epochs ({metrics['stopped']}), so no "
              "comparison is printed (the training's own message above says how to continue it).", file=sys.stderr)
        return {"signal": float(metrics.get("signal") or 0)}
    train_min = (time.perf_counter() - t0) / 60
    learned_model, _, _ = load_run(out, env.device)
    learned = _knn_rows(learned_model, cfg, train, test, env.device)

    k, t = cfg.run.knn_k, cfg.run.knn_t
    print()
    print(f"kNN top-1 on {len(test)} held-out digits   random init   NPID ({cfg.optim.epochs} epochs, {train_min:.1f} min)")
    for key, name in [("weighted", f"weighted kNN, k={k}, t={t} (NPID)"), ("nn1", "1-NN (nearest neighbour)")]:
        gain = learned[key] - rand[key]
        print(f"  {name:36s} {rand[key]:6.2f}%       {learned[key]:6.2f}%  ({gain:+.2f} points)")
    print(f"run outputs: {out}/ (config.json, metrics.jsonl, checkpoints/last.pt)")
    print(f"next: instdisc embed {out} --split test --out {out}/test.npy ; instdisc knn {out}")
    return {
        "random_top1": rand["weighted"], "learned_top1": learned["weighted"],
        "random_nn1": rand["nn1"], "learned_nn1": learned["nn1"],
    }

"""Do the label-free quality signals track the kNN curve? (issue: quality without labels)

Trains the given CPU presets with the kNN monitor at every epoch (for methods without a memory
bank, on a fixed `--knn-subset` of the training set) and the signals on their default subset, then
prints, for each signal, Spearman's rank correlation with kNN top-1 over the run's epochs. A
signal that tracks kNN has |rho| near 1 with the sign its direction predicts: alignment and
uniformity fall as features improve (rho < 0), RankMe and neighbour agreement rise (rho > 0).

    python benchmarks/quality_correlation.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --preset configs/npid_cifar10_cpu.yaml --preset configs/sela_cifar10_cpu.yaml --out runs/quality

    python benchmarks/quality_correlation.py --runs runs/quality/npid_cifar10_cpu   # table only

Results: docs/benchmarks.md, "Label-free quality signals".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SIGNALS = {"align": -1, "uniform": -1, "rankme": +1, "nn_agree": +1}  # the sign that means "tracks"


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (what Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den else float("nan")


def table(run: Path) -> dict[str, object]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    ep = [r for r in recs if r.get("type") == "epoch" and "knn_top1" in r]
    out: dict[str, object] = {"run": str(run), "epochs": len(ep), "knn_first": ep[0]["knn_top1"],
                              "knn_last": ep[-1]["knn_top1"]}
    for s, sign in SIGNALS.items():
        pts = [(r["knn_top1"], r[s]) for r in ep if s in r]
        if len(pts) >= 3:
            rho = spearman(np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
            out[s] = {"rho": round(rho, 3), "tracks": bool(sign * rho > 0.7), "first": pts[0][1], "last": pts[-1][1]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", default=[], help="a config to train (repeatable)")
    p.add_argument("--data", help="training data for the presets")
    p.add_argument("--out", default="runs/quality", help="folder of the runs")
    p.add_argument("--knn-subset", type=int, default=10000, help="kNN monitor's train side without a bank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="*", default=[], help="existing run folders: only print their table")
    a = p.parse_args()
    runs = [Path(r) for r in a.runs]
    for preset in a.preset:
        run = Path(a.out) / Path(preset).stem
        cmd = [sys.executable, "-m", "instdisc", "train", "--config", preset, "--data", a.data, "--out", str(run),
               "--seed", str(a.seed), "--knn-every", "1", "--knn-subset", str(a.knn_subset), "--no-progress",
               "--resume", "auto"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        runs.append(run)
    for run in runs:
        print(json.dumps(table(run)))


if __name__ == "__main__":
    main()

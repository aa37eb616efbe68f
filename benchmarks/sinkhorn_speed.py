"""Bar: SeLa's label solver on 50,000 x 3,000 at lambda = 25 is >= 3x faster than the paper code's
float64 Sinkhorn-Knopp (re-typed below as the baseline, run in the same process on the same input),
with >= 99.5% identical labels, and never NaN on peaked posteriors (logit std 2 and 5).

    python benchmarks/sinkhorn_speed.py                       # CPU, the bar's sizes (~2-3 min on 2 cores)
    python benchmarks/sinkhorn_speed.py --n 5000 --k 500      # quick look
    python benchmarks/sinkhorn_speed.py --baseline numpy      # the paper code's CPU path (slower still)

Input: logits ~ N(0, std^2) per entry, log-posteriors = log_softmax(logits), float32 (what a
network head gives). The baseline receives the posteriors already in float64 (its own storage
format; the conversion is not timed); ours receives the float32 log-posteriors. Both stop at the
same criterion, sum_i |N rowsum_i - 1| <= tol (the paper code's ImageNet value 0.1); the baseline
checks it every 10th iteration as the paper code does, ours every iteration.

The last line is one JSON object with every number, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from instdisc.sinkhorn import sinkhorn_knopp  # noqa: E402


def baseline_numpy(p: np.ndarray, lamb: float, tol: float, dtype=np.float64) -> tuple[np.ndarray, int]:
    """The paper code's CPU solver, re-typed: scale the K x N matrix P^lambda in place."""
    n, k = p.shape
    pl = p.T  # (K, N) view, as the paper code transposes
    pl **= lamb
    r = np.ones((k, 1), dtype=dtype) / k
    c = np.ones((n, 1), dtype=dtype) / n
    err, it = math.inf, 0
    with np.errstate(all="ignore"):
        while err > tol:
            r = dtype(1.0 / k) / (pl @ c)  # (K, 1)
            c_new = dtype(1.0 / n) / (r.T @ pl).T  # (N, 1)
            if it % 10 == 0:
                err = float(np.nansum(np.abs(c / c_new - 1)))
            c = c_new
            it += 1
            if not math.isfinite(err) or it > 100_000:
                break
        pl *= c.ravel()
        pl *= r  # Q = diag(r) P^lambda diag(c) in K x N
        labels = np.nanargmax(pl, axis=0) if np.isfinite(pl).any(axis=0).all() else np.full(n, -1)
    return labels, it


def baseline_torch(p: torch.Tensor, lamb: float, tol: float) -> tuple[torch.Tensor, int]:
    """The paper code's GPU solver (float64 torch, matrix-vector products), re-typed for one device."""
    n, k = p.shape
    pl = p.pow_(lamb)  # (N, K)
    r = torch.full((k,), 1.0 / k, dtype=p.dtype, device=p.device)
    c = torch.full((n,), 1.0 / n, dtype=p.dtype, device=p.device)
    err, it = math.inf, 0
    while err > tol:
        r = (1.0 / k) / (c @ pl)  # (K,)
        c_new = (1.0 / n) / (pl @ r)  # (N,)
        if it % 10 == 0:
            err = float((c / c_new - 1).abs().nansum())
        c = c_new
        it += 1
        if not math.isfinite(err) or it > 100_000:
            break
    labels = (pl * c[:, None] * r).argmax(1)
    return labels, it


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_log_p(n: int, k: int, std: float, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, k, generator=g, device=device) * std  # (N, K)
    return torch.log_softmax(logits, dim=1, out=logits)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--k", type=int, default=3_000)
    ap.add_argument("--lamb", type=float, default=25.0)
    ap.add_argument("--tol", type=float, default=0.1)
    ap.add_argument("--std", type=float, default=2.0, help="logit std of the speed comparison")
    ap.add_argument("--peaked", type=float, nargs="*", default=[2.0, 5.0], help="logit stds of the NaN check")
    ap.add_argument("--max-iter", type=int, default=1000, help="our solver's iteration cap")
    ap.add_argument("--baseline", choices=["torch", "numpy"], default="torch",
                    help="torch: the paper code's float64 GPU loop (on --device; on CPU the faster of the two), "
                         "numpy: its --cpu path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dev = torch.device(args.device)
    kind = args.baseline
    print(f"sinkhorn_speed: N={args.n} K={args.k} lambda={args.lamb} tol={args.tol} on {dev} "
          f"({torch.get_num_threads()} threads), baseline={kind}-float64", flush=True)
    result: dict[str, object] = {"n": args.n, "k": args.k, "lamb": args.lamb, "tol": args.tol, "device": str(dev),
                                 "threads": torch.get_num_threads(), "baseline": f"{kind}-float64"}

    runs: dict[float, dict[str, object]] = {}
    for std in dict.fromkeys([args.std, *args.peaked]):
        log_p = make_log_p(args.n, args.k, std, args.seed, dev)
        sync(dev)
        t = time.perf_counter()
        res = sinkhorn_knopp(log_p, args.lamb, args.tol, args.max_iter)
        sync(dev)
        ours_s = time.perf_counter() - t
        sizes = torch.bincount(res.labels, minlength=args.k)
        rec: dict[str, object] = {
            "std": std, "ours_s": round(ours_s, 3), "ours_iters": res.iters, "ours_err": res.err,
            "converged": res.converged,
            "finite": bool(torch.isfinite(res.log_u).all() and torch.isfinite(res.log_v).all() and math.isfinite(res.err)),
            "labels_in_range": bool(res.labels.min() >= 0 and res.labels.max() < args.k),
            "cluster_size_min_max": [int(sizes.min()), int(sizes.max())],
        }
        print(f"std {std}: ours {ours_s:.2f} s, {res.iters} iterations, err {res.err:.4f}, finite {rec['finite']}, "
              f"cluster sizes {rec['cluster_size_min_max']} (N/K = {args.n / args.k:.1f})", flush=True)
        if std == args.std:
            if kind == "numpy":
                p = log_p.double().exp_().cpu().numpy()  # the paper code's float64 storage (untimed)
                t = time.perf_counter()
                ref_labels, ref_iters = baseline_numpy(p, args.lamb, args.tol)
                base_s = time.perf_counter() - t
                ref = torch.from_numpy(ref_labels)
            else:
                p = log_p.double().exp_()
                sync(dev)
                t = time.perf_counter()
                ref, ref_iters = baseline_torch(p, args.lamb, args.tol)
                sync(dev)
                base_s = time.perf_counter() - t
            del p
            agree = float((ref.to(res.labels.device) == res.labels).float().mean())
            rec.update({"baseline_s": round(base_s, 3), "baseline_iters": ref_iters, "speedup": round(base_s / ours_s, 2),
                        "identical_labels": agree})
            print(f"std {std}: baseline {base_s:.2f} s, {ref_iters} iterations -> speedup {base_s / ours_s:.2f}x, "
                  f"identical labels {100 * agree:.3f}%", flush=True)
        runs[std] = rec
        del log_p
    result["runs"] = list(runs.values())
    speed = runs[args.std]
    ok = (speed["speedup"] >= 3 and speed["identical_labels"] >= 0.995
          and all(r["finite"] and r["labels_in_range"] for r in runs.values()))
    result["bar_met"] = bool(ok)
    print(f"bar (>= 3x, >= 99.5% identical, never NaN): {'met' if ok else 'NOT met'}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

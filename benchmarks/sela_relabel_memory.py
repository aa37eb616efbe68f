"""SeLa's label pass for one head: time and peak memory of the relabel, the current code against the
earlier full-matrix code, on the same synthetic problem in one run.

    python benchmarks/sela_relabel_memory.py                                  # 50k, 200k, 800k (K=1000 and 3000)
    python benchmarks/sela_relabel_memory.py --points 20000:500 --d 64        # quick look

Problem: features (N, D) ~ N(0, 1) (what the backbone gives to the heads) and one random linear
head (K, D) scaled so the logits have standard deviation --logit-std, solved at lambda 25 with
the preset's Sinkhorn settings (tol 0.1, at most 1000 iterations, over-relaxation on). One rank.

Paths:
  full   the earlier SeLa.relabel, re-typed here: log_softmax of the whole (N, K) logit matrix,
         then ``sinkhorn_knopp`` on it (the solver makes its kernel, a second (N, K) array).
  rows   ``SeLa.relabel`` as it is now, fed through ``EpochContext.predict_shard``: one (N, K)
         kernel, log-posteriors recomputed block by block from the features.

Memory: every (path, N, K) runs in a fresh child process. After the features and the head exist,
the child resets the kernel's peak-RSS counter (writes 5 to /proc/self/clear_refs) and reads its
resident set; after the relabel it reads the peak (VmHWM). The figure is the growth, peak minus
the resident set before: every byte the relabel itself touched (torch's CPU tensors come from
malloc, and glibc returns large blocks to the kernel on free, so the peak is the true peak). It
does not include the (N, D) features, which both paths receive. A point is skipped (and says so)
when its estimated need is above MemAvailable minus 2 GiB.

The labels of both paths are compared (identical: yes/no). The last line is one JSON object with
every number, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.M).group(1))


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", fh.read(), re.M).group(1)) * 1024


def child(path: str, n: int, k: int, d: int, logit_std: float, seed: int, labels_out: str) -> dict:
    import numpy as np
    import torch
    from torch import nn

    from instdisc.methods import resolve_config
    from instdisc.methods.base import EpochContext
    from instdisc.methods.sela import SeLa
    from instdisc.sinkhorn import sinkhorn_knopp

    torch.manual_seed(seed)
    cfg = resolve_config({"hc": 1, "ncl": [k], "lamb": 25.0, "sk_tol": 0.1, "sk_max_iter": 1000, "export_labels": False}, {}, "sela")
    method = SeLa(nn.Identity(), d, n, cfg.method)
    feats = torch.randn(n, d)  # (N, D), made in place: no transient above the baseline
    with torch.no_grad():
        method.heads.weight.normal_(0.0, logit_std / d**0.5)
        method.heads.bias.zero_()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if path == "full":
        with torch.no_grad():
            w, b = method.heads.weight.float(), method.heads.bias.float()
            log_p = torch.log_softmax(feats @ w.t() + b, dim=1)  # (N, K)
            res = sinkhorn_knopp(log_p, 25.0, 0.1, 1000)
            del log_p
        labels, iters, rebuilds = res.labels, res.iters, res.rebuilds
    else:
        logs = method.relabel(EpochContext(epoch=0, num_epochs=1, predict_all=None, predict_shard=lambda fn: fn(feats)), [0])
        labels, iters, rebuilds = method.labels[0], int(logs["sk_iters"]), int(logs["sk_rebuilds"])
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    np.save(labels_out, labels.numpy())
    return {"path": path, "n": n, "k": k, "d": d, "seconds": round(seconds, 2), "iters": iters, "rebuilds": rebuilds,
            "peak_growth_bytes": (peak - before) * 1024, "nk_fp32_bytes": n * k * 4,
            "threads": torch.get_num_threads()}


def estimate_bytes(path: str, n: int, k: int, d: int) -> int:
    # Features plus what each path holds at its peak (2 or 1 N x K arrays, plus blocks of 8192 rows).
    return n * d * 4 + (2 if path == "full" else 1) * n * k * 4 + 3 * 8192 * k * 4 + (1 << 29)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", default=["50000:3000", "200000:3000", "800000:1000", "800000:3000"],
                    help="N:K pairs")
    ap.add_argument("--paths", nargs="+", default=["full", "rows"], choices=["full", "rows"])
    ap.add_argument("--d", type=int, default=128, help="feature width D")
    ap.add_argument("--logit-std", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=4, metavar=("PATH", "N", "K", "LABELS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, n, k, out = args.child
        print(json.dumps(child(path, int(n), int(k), args.d, args.logit_std, args.seed, out)))
        return

    import numpy as np

    results, tmp = [], tempfile.mkdtemp(prefix="sela_relabel_")
    for point in args.points:
        n, k = (int(x) for x in point.split(":"))
        labels = {}
        for path in args.paths:
            need, avail = estimate_bytes(path, n, k, args.d), _mem_available_bytes()
            if need > avail - (2 << 30):
                print(f"N={n} K={k} {path}: skipped, needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available", flush=True)
                results.append({"path": path, "n": n, "k": k, "skipped": True, "need_gib": round(need / 2**30, 1)})
                continue
            out = os.path.join(tmp, f"{path}_{n}_{k}.npy")
            cmd = [sys.executable, __file__, "--d", str(args.d), "--logit-std", str(args.logit_std), "--seed",
                   str(args.seed), "--child", path, str(n), str(k), out]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"child failed: {path} N={n} K={k}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["per_nk"] = round(r["peak_growth_bytes"] / r["nk_fp32_bytes"], 3)
            results.append(r)
            labels[path] = np.load(out)
            os.remove(out)
            print(f"N={n} K={k} {path}: {r['seconds']:.1f} s, {r['iters']} iterations, {r['rebuilds']} rebuilds, "
                  f"peak growth {r['peak_growth_bytes'] / 2**30:.2f} GiB = {r['per_nk']} x N*K*4 B", flush=True)
        if len(labels) == 2:
            same = bool(np.array_equal(labels["full"], labels["rows"]))
            print(f"N={n} K={k}: identical labels: {'yes' if same else 'NO'}", flush=True)
            for r in results[-2:]:
                r["labels_identical"] = same
    print(json.dumps({"d": args.d, "logit_std": args.logit_std, "seed": args.seed, "results": results}))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# PIC on CIFAR-10 with the CPU preset (same backbone, images and ~15-minute budget as
# benchmarks/npid_cifar10_cpu.sh), then its learning curve (kNN per epoch) from metrics.jsonl.
#   bash benchmarks/pic_cifar10_cpu.sh [DATA] [OUT]
set -euo pipefail
DATA=${1:-../shared/data/cifar10-jpeg.tar.gz}
OUT=${2:-runs/bench_pic_cifar10_cpu}
start=$(date +%s)
instdisc train --config configs/pic_cifar10_cpu.yaml --data "$DATA" --out "$OUT" --overwrite --no-progress
echo "wall time: $(( $(date +%s) - start )) s"
python - "$OUT/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["type"] in ("epoch", "final"):
        print(r["type"], r["epoch"], f"loss {r.get('loss', float('nan')):.3f}",
              f"kNN top-1 {r.get('knn_top1', float('nan')):.2f}", f"{r.get('img_per_s', float('nan')):.0f} img/s")
PY

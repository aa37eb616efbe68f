#!/usr/bin/env bash
# Bar: the CPU CIFAR-10 preset finishes in <= 15 minutes on a 2-core machine with weighted kNN
# top-1 >= 50% on the 10,000 test images. Prints the learning curve (kNN per epoch) at the end.
#   bash benchmarks/npid_cifar10_cpu.sh [DATA] [OUT]
set -euo pipefail
DATA=${1:-../shared/data/cifar10-jpeg.tar.gz}
OUT=${2:-runs/bench_npid_cifar10_cpu}
start=$(date +%s)
instdisc train --config configs/npid_cifar10_cpu.yaml --data "$DATA" --out "$OUT" --overwrite --no-progress
echo "wall time: $(( $(date +%s) - start )) s"
python - "$OUT/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["type"] in ("epoch", "final"):
        print(r["type"], r["epoch"], f"loss {r.get('loss', float('nan')):.3f}", f"kNN top-1 {r.get('knn_top1', float('nan')):.2f}")
PY

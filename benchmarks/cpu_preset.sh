#!/usr/bin/env bash
# Train a method's CPU CIFAR-10 preset (configs/METHOD_cifar10_cpu.yaml: width-16 ResNet-18, 16 px,
# ~15 minutes on a 2-core machine), print the wall time, then its learning curve from metrics.jsonl.
#   bash benchmarks/cpu_preset.sh METHOD [DATA] [OUT]      (METHOD: npid | pic | moco | simclr)
#   NPROC=2 bash benchmarks/cpu_preset.sh ...   the same under torchrun: 2 processes of 1 thread each,
#                                               1.4x faster than 1 process of 2 threads on 2 cores
set -euo pipefail
METHOD=${1:?usage: cpu_preset.sh METHOD [DATA] [OUT]}
DATA=${2:-../shared/data/cifar10-jpeg.tar.gz}
OUT=${3:-runs/bench_${METHOD}_cifar10_cpu}
start=$(date +%s)
ARGS=(train --config "configs/${METHOD}_cifar10_cpu.yaml" --data "$DATA" --out "$OUT" --overwrite --no-progress)
if [ "${NPROC:-1}" -gt 1 ]; then
  torchrun --standalone --nproc_per_node="$NPROC" -m instdisc "${ARGS[@]}"
else
  instdisc "${ARGS[@]}"
fi
echo "wall time: $(( $(date +%s) - start )) s"
python - "$OUT/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["type"] in ("epoch", "final"):
        print(r["type"], r["epoch"], f"loss {r.get('loss', float('nan')):.3f}",
              f"kNN top-1 {r.get('knn_top1', float('nan')):.2f}", f"{r.get('img_per_s', float('nan')):.0f} img/s")
PY

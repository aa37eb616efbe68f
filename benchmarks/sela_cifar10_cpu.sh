#!/usr/bin/env bash
# Bar: the SeLa CPU CIFAR-10 preset (same backbone and budget as configs/npid_cifar10_cpu.yaml)
# finishes in <= 15 minutes on a 2-core machine; reports the final weighted kNN top-1 on the 10,000
# test images and the NMI / Hungarian accuracy of the K = 10 head (head 3) at each relabelling.
#   bash benchmarks/sela_cifar10_cpu.sh [DATA] [OUT]
set -euo pipefail
DATA=${1:-../shared/data/cifar10-jpeg.tar.gz}
OUT=${2:-runs/bench_sela_cifar10_cpu}
start=$(date +%s)
instdisc train --config configs/sela_cifar10_cpu.yaml --data "$DATA" --out "$OUT" --overwrite --no-progress
echo "wall time: $(( $(date +%s) - start )) s"
instdisc clusters "$OUT" --head 3
python - "$OUT/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["type"] == "epoch":
        k10 = f" | K=10 head relabelled: NMI {r['nmi_h3']:.3f} acc {100 * r['acc_h3']:.2f}%" if "nmi_h3" in r else ""
        print(f"epoch {r['epoch']} loss {r['loss']:.3f} ({r['time_s']:.0f} s"
              + (f", relabel {r['relabel_s']:.0f} s" if "relabel_s" in r else "") + ")" + k10)
    elif r["type"] == "final":
        print(f"final weighted kNN top-1 {r['knn_top1']:.2f}% top-5 {r['knn_top5']:.2f}%")
PY

#!/usr/bin/env bash
# SimCLR on CIFAR-10 with the CPU preset (same backbone, images and ~15-minute budget as
# benchmarks/npid_cifar10_cpu.sh), then its learning curve (kNN every 2 epochs) from metrics.jsonl.
#   bash benchmarks/simclr_cifar10_cpu.sh [DATA] [OUT]
exec bash "$(dirname "$0")/cpu_preset.sh" simclr "$@"

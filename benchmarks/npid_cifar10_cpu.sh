#!/usr/bin/env bash
# Bar: the CPU CIFAR-10 preset finishes in <= 15 minutes on a 2-core machine with weighted kNN
# top-1 >= 50% on the 10,000 test images. Prints the learning curve (kNN per epoch) at the end.
#   bash benchmarks/npid_cifar10_cpu.sh [DATA] [OUT]
exec bash "$(dirname "$0")/cpu_preset.sh" npid "$@"

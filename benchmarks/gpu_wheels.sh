#!/usr/bin/env bash
# Run HERE (a machine with the package registry) before benchmarks/gpu_check.sh: downloads into
# .whl/ (git-ignored) the pure-Python wheels that bayesprune needs and the device image lacks.
# The device's Python is 3.12 and already has torch, numpy, scipy, matplotlib, safetensors, tqdm,
# opt-einsum; arviz is imported only by bp.to_arviz, which the GPU check does not call. Also
# bayesian-torch (the comparison rows) and a copy of the Fashion-MNIST IDX files into .whl/fmnist
# (the device has no dataset-fashion-mnist; about 30 MB of the 64 MiB a call may carry).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pyro-ppl==1.9.2 pyro-api==0.1.2 bayesian-torch==0.5.0
mkdir -p .whl/fmnist
cp "${BAYESPRUNE_DATA:-/usr/share/datasets/fashion-mnist}"/*-ubyte.gz .whl/fmnist/
ls -l .whl .whl/fmnist

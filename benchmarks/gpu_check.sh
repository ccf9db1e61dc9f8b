#!/usr/bin/env bash
# The GPU rows of benchmarks/README.md#svi-speed on one GPU, in about 7 minutes: SVI step time of
# LeNet-300-100 and ResNet-20 against deterministic training (with operator counts), compiled
# and eager (docs/compiled-step.md), and the posterior-predictive draw against a forward pass;
# then the GPU rows of benchmarks/README.md#distributed: bp.fit(devices=N) seconds per epoch on
# 1 GPU, and on 2 and all GPUs where the machine has them (NCCL). Writes the JSON to $OUT (the
# device tool's output folder) or, without it, to benchmarks/results/.
#
# Here:      bash benchmarks/gpu_wheels.sh            (once: pyro-ppl for the bare device image)
# On a GPU:  the device tool's run, with carry [".whl"] and the command
#            bash benchmarks/gpu_check.sh
# Then copy the four JSON files into benchmarks/results/ and regenerate the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
site=/tmp/bayesprune-site
rm -rf "$site"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
# bayesprune itself, from this checkout (its models/ folder installs as bayesprune.models)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .
export PYTHONPATH="$site"
out="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, pyro, bayesprune; print('torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available())"
python3 benchmarks/svi_speed.py --device cuda --steps 200 --models lenet_300_100 resnet20 --ops \
    --json "$out/svi_speed_gpu.json"
python3 benchmarks/svi_speed.py --device cuda --steps 100 --predict --models lenet_300_100 resnet20 \
    --json "$out/svi_predict_gpu.json"
# bp.fit(compile=True) against eager, per step (cold inductor cache; about a minute)
python3 benchmarks/compile_speed.py --device cuda --no-fits --steps 200 40 \
    --json "$out/compile_speed_gpu.json"
# data-parallel SVI: 1 GPU, then 2 and all of them where present (one process per GPU, NCCL)
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
devices="1"
if [ "$ngpu" -ge 2 ]; then devices="$devices 2"; fi
if [ "$ngpu" -gt 2 ]; then devices="$devices $ngpu"; fi
python3 benchmarks/distributed.py --device cuda --devices $devices --train 20000 --batch-size 512 \
    --no-memory --json "$out/distributed_gpu.json"

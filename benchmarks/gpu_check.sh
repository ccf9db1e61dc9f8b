#!/usr/bin/env bash
# On one GPU, in about 8 minutes (each step has a time limit): tests/test_gpu.py (fit, prune,
# predict, certify, reload and a compiled fit on the GPU), then the GPU rows of docs/gpu.md: SVI
# step time of LeNet-300-100 and ResNet-20 against deterministic training (with operator counts
# and peak memory), compiled and eager (docs/compiled-step.md), and the posterior-predictive
# draw against a forward pass, and whole default fits against dense training (fit_cost.py);
# then the GPU rows of benchmarks/README.md#distributed: bp.fit(devices=N) seconds per epoch on
# 1 GPU, and on 2 and all GPUs where the machine has them (NCCL). Writes the JSON to $OUT (the
# device tool's output folder) or, without it, to benchmarks/results/.
#
# Here:      bash benchmarks/gpu_wheels.sh            (once: pyro-ppl for the bare device image)
# On a GPU:  the device tool's run, with carry [".whl"] and the command
#            bash benchmarks/gpu_check.sh
# Then copy the JSON files into benchmarks/results/ and regenerate the tables. A step that
# fails is reported and the next one still runs (each writes its own JSON); the log goes to
# $OUT/gpu_check.log as well.
set -uo pipefail
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
if [ -d .whl/fmnist ]; then export BAYESPRUNE_DATA="$PWD/.whl/fmnist"; fi
exec > >(tee -a "$out/gpu_check.log") 2>&1
failed=""
step() {  # step NAME SECONDS COMMAND...: run with a time limit; note a failure and go on
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" || { echo "== $name FAILED (exit $?)"; failed="$failed $name"; }
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, pyro, bayesprune; print('torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available())"
# the user's path on the GPU (tests/test_gpu.py; skipped where there is none), from outside the
# checkout so that the installed package (with bayesprune.models) is the one imported
repo=$PWD
step gpu_tests 150 bash -c "cd /tmp && python3 -m pytest -q -p no:cacheprovider -c '$repo/pyproject.toml' \
    --rootdir '$repo' '$repo/tests/test_gpu.py'"
# 60 steps a model (200 took over 200 s with the end-to-end fits, which scale with --steps);
# each model's rows are merged into the one JSON file
for m in lenet_300_100 resnet20; do
    step "svi_speed $m" 150 python3 benchmarks/svi_speed.py --device cuda --steps 60 --warmup 5 \
        --models $m --ops --memory --json "$out/svi_speed_gpu.json"
done
step svi_predict 60 python3 benchmarks/svi_speed.py --device cuda --steps 100 --predict \
    --models lenet_300_100 resnet20 --json "$out/svi_predict_gpu.json"
# bp.fit(compile=True) against eager, per step (cold inductor cache; about a minute)
step compile_speed 150 python3 benchmarks/compile_speed.py --device cuda --no-fits --steps 200 40 \
    --json "$out/compile_speed_gpu.json"
# whole default fits against bp.train of the same net and batches (Fashion-MNIST; the exact gate
# tests included), short and long, LeNet-300-100 and ResNet-20 (about a minute)
step fit_cost 120 python3 benchmarks/fit_cost.py --device cuda --cells 1 2 5 6 \
    --json "$out/fit_cost_gpu.json"
# data-parallel SVI: 1 GPU, then 2 and all of them where present (one process per GPU, NCCL)
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
devices="1"
if [ "$ngpu" -ge 2 ]; then devices="$devices 2"; fi
if [ "$ngpu" -gt 2 ]; then devices="$devices $ngpu"; fi
step distributed 90 python3 benchmarks/distributed.py --device cuda --devices $devices --train 20000 \
    --batch-size 512 --no-memory --json "$out/distributed_gpu.json"
echo "== done $(date +%T); failed:${failed:- none}"
[ -z "$failed" ]

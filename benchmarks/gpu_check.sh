#!/usr/bin/env bash
# One pass over the CUDA paths on a GPU machine, for a short lease: bf16 autocast through Fabric,
# a 2-round federated run, the paper-size training step (time and peak memory), and the demo.
# Usage: benchmarks/gpu_check.sh OUT_DIR   (the package importable, e.g. pip install -e .)
set -uo pipefail
out="${1:?usage: benchmarks/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
export LIGHTNING_FL_DATA="$out/data" PYTHONUNBUFFERED=1
gpu=(fabric.accelerator=gpu logger.wandb.mode=disabled logger.progress=false)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, lightning, monai; print('torch', torch.__version__, 'lightning', lightning.__version__, 'monai', monai.__version__, 'bf16', torch.cuda.is_bf16_supported())"
echo "== smoke run (2 rounds) on the GPU"
time python3 -m lightning_fl fit --config configs/smoke.yaml "${gpu[@]}" output_dir="$out/smoke" | tail -12
echo "== paper-size step (DynUNet 32..320, 224x224x64 patches, batch 2x2)"
python3 benchmarks/condist_cost.py --config configs/condistfl_paper.yaml --repeats 10
echo "== demo-size step on the GPU"
python3 benchmarks/condist_cost.py "${gpu[@]:0:1}"
echo "== the demo on the GPU"
time timeout 300 python3 -m lightning_fl fit "${gpu[@]}" output_dir="$out/demo" | tail -12

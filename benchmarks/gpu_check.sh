#!/usr/bin/env bash
# One pass over the CUDA paths on a GPU machine, for a short lease: bf16 autocast through Fabric in
# a 2-round federated run; evaluate (cross-site), infer and export on the GPU; the paper-size
# training step (time, peak memory); paper-size inference on the real CT volumes; and the CPU
# cost of the paper's data pipeline per loader worker (one thread).
# Usage: benchmarks/gpu_check.sh OUT_DIR [REALDATA_DIR]   (REALDATA_DIR: the real CT volumes folder;
# the package importable, e.g. pip install -e .)
set -uo pipefail
out="${1:?usage: benchmarks/gpu_check.sh OUT_DIR [REALDATA_DIR]}"
realdata="${2:-../shared/realdata}"
mkdir -p "$out"
export LIGHTNING_FL_DATA="$out/data" PYTHONUNBUFFERED=1
gpu=(fabric.accelerator=gpu logger.wandb.mode=disabled logger.progress=false)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, lightning, monai; print('torch', torch.__version__, 'lightning', lightning.__version__, 'monai', monai.__version__, 'bf16', torch.cuda.is_bf16_supported(), 'cpus', len(__import__('os').sched_getaffinity(0)))"
echo "== smoke run (2 rounds) on the GPU"
time timeout 150 python3 -m lightning_fl fit --config configs/smoke.yaml "${gpu[@]}" output_dir="$out/smoke" | tail -14
echo "== evaluate --cross-site, infer (probabilities) and export on the GPU, smoke model"
timeout 60 python3 -m lightning_fl evaluate --checkpoint "$out/smoke/best.ckpt" "$out/smoke/last.ckpt" --cross-site --output "$out/eval" "${gpu[@]}"
timeout 60 python3 -m lightning_fl infer --checkpoint "$out/smoke/best.ckpt" --input "$realdata/ts_example_ct.nii.gz" --output "$out/infer" --probabilities "${gpu[@]}"
timeout 60 python3 -m lightning_fl export --checkpoint "$out/smoke/best.ckpt" --output "$out/export"
echo "== paper-size step (DynUNet 32..320, 224x224x64 patches, batch 2x2)"
timeout 180 python3 benchmarks/condist_cost.py --config configs/condistfl_paper.yaml --repeats 10
echo "== paper-size inference on real CT"
timeout 150 python3 benchmarks/inference_time.py --realdata "$realdata" --torchscript fabric.accelerator=gpu
echo "== paper pipeline on this machine's CPU, one thread (what one data-loader worker does)"
timeout 150 python3 benchmarks/preprocessing.py --realdata "$realdata" --threads 1 --repeats 2

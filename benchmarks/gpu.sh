#!/usr/bin/env bash
# The README's GPU rows, in one go, from the repository root of a CUDA machine (about 8 minutes on an H200):
#     bash benchmarks/gpu.sh [OUTDIR]
# Every step has its own time limit, so one slow step cannot take the others' results with it.
set -uo pipefail
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() { local limit=$1 name=$2; shift 2; echo "== $name: $*"; timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, open_clip, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__)"
step 120 tests python3 -m pytest -q -p no:cacheprovider -x tests/test_gpu.py
step 150 tta_speed python3 benchmarks/tta_speed.py --archs ViT-B-16 --classes 1000 --images 8 --amp bf16
step 100 train_speed python3 benchmarks/train_speed.py --archs ViT-B-16 --classes 1000 --iters 5 --amp bf16
step 130 methods python3 benchmarks/methods.py --arch ViT-B-16 --classes 1000 --batch 32 --iters 3 --amp bf16 \
    --methods coop cocoop kgcoop vpt maple promptsrc

#!/usr/bin/env bash
# The one prepared GPU check of issue 5 (VCReg on every block for at most 1.05x time and memory).
#
# For a session that is lent a device machine (H100 / H200); about 5 minutes of device time. From the repository
# root, through the `device` tool:
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
#
# It needs no network: the device image's python3 has torch, transformers and timm; hf_vcreg is imported from
# the working tree (PYTHONPATH). Steps:
#   1. the CUDA-only correctness test: the tensor-core statistics path (bf16 autocast, float32 accumulation)
#      against float64 autograd, within bf16 rounding;
#   2. benchmarks/overhead.py --preset gpu: ViT-B/16 (transformers and timm), ResNet-50, ConvNeXt-T, 224x224,
#      batch 128, bf16 autocast, AdamW; plain Trainer vs VCRegTrainer (gradient and loss) alternating in one
#      process; goal <= 1.05x step time and peak memory;
#   3. benchmarks/scaling.py on CUDA (bf16 autocast) for the cost-vs-n-and-d table.
# Results land in benchmarks/results/{overhead,scaling}_cuda.{json,md} and are copied to $OUT (the device tool
# brings them back); commit them with a note naming the card.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" benchmarks/results

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu_check.log"
$PY -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/gpu_check.log"

status=0
timeout 120 $PY -m pytest tests/test_performance_paths.py -q -x -k cuda -p no:cacheprovider 2>&1 | tee -a "$OUT/gpu_check.log" || status=1
timeout 330 $PY benchmarks/overhead.py --preset gpu 2>&1 | tee -a "$OUT/gpu_check.log" || status=1
timeout 60 $PY benchmarks/scaling.py --device cuda --dtype bf16 --clock wall --reps 20 2>&1 | tee -a "$OUT/gpu_check.log" || status=1

for f in benchmarks/results/overhead_cuda.json benchmarks/results/overhead_cuda.md \
         benchmarks/results/scaling_cuda.json benchmarks/results/scaling_cuda.md; do
  [ -f "$f" ] && [ "$OUT" != benchmarks/results ] && cp "$f" "$OUT/"
done
exit $status

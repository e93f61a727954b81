#!/usr/bin/env bash
# The GPU checks in one short run (SD v1.5 architecture, random weights): fine-tuning samples/s with bank
# latents vs per-step VAE encoding, then the sampler grid against the reference's settings.
# Needs torch, transformers, peft, accelerate and diffusers; a box without diffusers can install wheels
# from ./.whl first (WHEELS=1). Logs and CSVs go to ${OUT:-runs/gpu_check}.
#
#   WHEELS=1 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ "${WHEELS:-0}" == 1 ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
timeout 150 python3 benchmarks/bench_finetune.py --batch-size 8 --iters 10 --warmup 3 2>&1 | grep -v Warning | tee "$OUT/finetune.log"
timeout 150 python3 benchmarks/bench_finetune.py --batch-size 32 --iters 6 --warmup 2 2>&1 | grep -v Warning | tee -a "$OUT/finetune.log"
timeout 300 python3 benchmarks/bench_sampler.py --dtypes fp16,bf16 --batch-sizes 8,32 --channels-last 1 --iters 3 \
  --csv "$OUT/sampler.csv" 2>&1 | grep -v Warning | tee "$OUT/sampler.log"

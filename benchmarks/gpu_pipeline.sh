#!/usr/bin/env bash
# The GPU check in one command (SD v1.5 architecture, random weights; nothing is downloaded):
#   pipeline  the whole job through Ray on this machine's GPU, each stage measured (benchmarks/gpu_pipeline.py)
#   sampler   generation rows against the reference's settings (benchmarks/bench_sampler.py)
#   finetune  the LoRA step at the reference's batch of 8, eager and CUDA-graphed (benchmarks/bench_finetune.py)
#   profile   where the sampling time of jobs/configs/in1k.yaml's sampler goes (benchmarks/profile_unet.py)
# Results (at most 8 files) go to ${OUT:-runs/gpu_pipeline}; the model, data and run to ${WORK:-/tmp/realfake-gpu-pipeline}.
#
#   bash benchmarks/gpu_pipeline.sh --all          # every part, each capped (210/150/100/90 s): under 10 min
#   bash benchmarks/gpu_pipeline.sh                # the pipeline only; or name parts: --sampler --profile ...
#   bash benchmarks/gpu_pipeline.sh --dry-run      # the pipeline on the CPU at tiny shapes (what the tests run)
#   bash benchmarks/gpu_pipeline.sh --all --dry-run
#
# Python packages missing on the box (Ray, diffusers, pydantic, ...) are installed from ./.whl into /tmp/site
# (benchmarks/gpu_wheels.sh fills .whl on a machine with pip); arguments after `--` go to gpu_pipeline.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_pipeline}
PY=${PYTHON:-python3}
DRY=0 PARTS=() EXTRA=()
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --all) PARTS=(pipeline sampler finetune profile) ;;
    --pipeline|--sampler|--finetune|--profile) PARTS+=("${1#--}") ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu_pipeline.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
((${#PARTS[@]})) || PARTS=(pipeline)
WORK=${WORK:-/tmp/realfake-gpu-pipeline$( ((DRY)) && echo -dry)}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import ray, diffusers, pydantic, peft" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "Ray/diffusers/pydantic/peft missing and no wheels in .whl/: run" \
    "benchmarks/gpu_wheels.sh where pip works, and carry .whl" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  for archive in .whl/*.tar.xz; do tar -xJf "$archive" -C /tmp/site || exit 1; done
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

has() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }
# Each part is capped on the GPU box, so that a stuck one cannot eat the next one's time (a CPU's dry run is not).
cap() { local s=$1; shift; if ((DRY)); then "$@"; else timeout --kill-after=10 "$s" "$@"; fi; }
status=0
if has pipeline; then
  echo "== pipeline"
  cap 210 "$PY" benchmarks/gpu_pipeline.py --out "$OUT" --work "$WORK" $( ((DRY)) && echo --dry-run) "${EXTRA[@]}" || status=1
fi
if ((DRY)); then  # the benchmark scripts' tiny CPU runs: every row eager (torch.compile on a CPU takes minutes)
  SAMPLER_ARGS=(--tiny --device cpu --iters 1 --warmup 0 --no-reference --row name=eager,steps=4,batch_size=2
                --row name=eager+fuse_qkv+math,steps=4,batch_size=2,fuse_qkv=1,sdpa_backend=math)
  FINETUNE_ARGS=(--tiny --device cpu --iters 1 --warmup 0 --check-steps 2 --skip-vae)
  PROFILE_ARGS=(--tiny --device cpu --set generate.steps=4 --set generate.batch_size=2 --warmup 1 --top 10)
else  # before (the reference's settings, then jobs/configs/in1k.yaml's) and after, in one run
  COMMON=dtype=bf16,batch_size=32,channels_last=1
  SAMPLER_ARGS=(--iters 2 --warmup 1 --no-reference
                --row name=reference,reference=1,dtype=fp16,batch_size=24
                --row name=eager,$COMMON
                --row name=compiled,$COMMON,compile=1
                --row name=cuda-graphs,$COMMON,compile=1,compile_mode=reduce-overhead
                --row name=eager+fuse_qkv,$COMMON,fuse_qkv=1
                --row name=eager+cudnn-attention,$COMMON,sdpa_backend=cudnn)
  FINETUNE_ARGS=(--batch-size 8 --compile 0,1 --compile-mode reduce-overhead --skip-vae --iters 10 --warmup 2 --check-steps 5)
  PROFILE_ARGS=(--config jobs/configs/in1k.yaml --warmup 2 --top 30)
  [[ -f "$WORK/model/model_index.json" ]] && PROFILE_ARGS+=(--model "$WORK/model")
fi
if has sampler; then
  echo "== sampler"
  cap 150 "$PY" benchmarks/bench_sampler.py "${SAMPLER_ARGS[@]}" --csv "$OUT/sampler.csv" 2>&1 | tee "$OUT/sampler.log" || status=1
fi
if has finetune; then
  echo "== finetune"
  cap 100 "$PY" benchmarks/bench_finetune.py "${FINETUNE_ARGS[@]}" --json "$OUT/finetune.json" 2>&1 | tee "$OUT/finetune.log" || status=1
fi
if has profile; then
  echo "== profile"
  cap 90 "$PY" benchmarks/profile_unet.py "${PROFILE_ARGS[@]}" --out "$OUT/profile.txt" || status=1
fi
echo "== results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $status

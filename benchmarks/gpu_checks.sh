#!/usr/bin/env bash
# Everything this project checks on a CUDA machine, in one go (each part under its own time limit):
# the CUDA tests (parity, fp8 streaming, caches, compile; FLUX.1 and FLUX.2), training on the GPU, and the two
# GPU benchmarks. Logs go to a new folder, $OUT (default ./gpu_logs/<date-time>); existing logs are never
# overwritten.   bash benchmarks/gpu_checks.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_logs/$(date +%Y%m%d-%H%M%S)}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then echo "gpu_checks.sh: $OUT is not empty: name a new folder in OUT" >&2; exit 2; fi
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${CUDA_TESTS_S:-240} $PY -m pytest -q -p no:cacheprovider -rs --durations=8 tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
timeout ${TRAIN_TESTS_S:-150} $PY -m pytest -q -p no:cacheprovider -rs --durations=8 \
  tests/test_flux2_training.py tests/test_training.py \
  -k "pulls_the_loss_down or resume_after or (klein-4B and lora) or learns_the_training_image" 2>&1 | tee "$OUT/training_on_gpu.log"
timeout ${FLUX2_BENCH_S:-180} $PY benchmarks/gpu_flux2.py 2>&1 | tee "$OUT/gpu_flux2.log"
DIFFSYNTH_BENCH_STEPS=${STEPS:-28} timeout ${FULL_BENCH_S:-400} $PY benchmarks/gpu_full.py 2>&1 | tee "$OUT/gpu_full.log"

#!/usr/bin/env bash
# Everything a session with a lent GPU owes issue 9, as one call of the device
# tool (about 9 minutes; the lease is 15): the CUDA tests, the GPU table, and
# the A/B of the splits merged in the elementwise kernels (the default) against
# the finalize kernels. Results land in $OUT (the device tool's folder), else
# in bench/results/; commit the table as bench/results/gpu_<device>.{md,json}.
#   device run:  BNLIB_COMMIT=<git rev-parse --short HEAD, here> bash bench/gpu_check.sh
#   (the device's copy of the tree has no .git; the results file records the commit)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "== CUDA tests"
  # every test marked cuda (a module that cannot be imported there is reported, the rest still run)
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda --continue-on-collection-errors \
      tests/test_triton.py tests/test_cuda.py tests/test_normalizer_free.py tests/test_sync_batchnorm.py \
      tests/test_ghost_batchnorm.py 2>&1 | tail -15
  echo "== GPU table (bench/bench_gpu.py --wall)"
  timeout 240 python3 bench/bench_gpu.py --wall --rounds 20 --out "$out" 2>&1 | tail -60
  echo "== merged splits vs finalize kernels (SWEEP 0: default, 16: finalize always, 17: merge up to 256)"
  timeout 100 python3 bench/bench_gpu.py --sweep --sweep-configs 0,16,17 --dtypes float32 \
      --sweep-layouts contiguous,channels_last --rounds 20 --sweep-seconds 80 --out "$out" 2>&1 | grep "^# sweep"
} 2>&1 | tee "$out/gpu_check.log"

#!/usr/bin/env bash
# Reproduce benchmarks/results/sae_kernels*.json on the GPU machine (one H100; no package registry there).
#
# Here, once (from the repo root):
#   bash ../shared/device/prepare_mlx_cuda.sh          # MLX CUDA wheels -> .gpu1/ (half 1), .gpu2/ (half 2)
#   echo /.gpu3/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .gpu3 eai-sparsify==1.3.3 natsort simple-parsing docstring-parser schedulefree
# Then two `run` calls back to back (the machine must stay warm in between):
#   1. carry [".gpu1"]:          mkdir -p ~/.cache/mlx-stash && cp .gpu1/* ~/.cache/mlx-stash/
#   2. carry [".gpu2", ".gpu3"]: bash benchmarks/gpu_run.sh            (results land in $OUT)
# A fresh machine JIT-compiles every kernel first (NVRTC; minutes in total): keep each call under 10 minutes,
# e.g. `SECTIONS=kernels,forward bash benchmarks/gpu_run.sh` then `BENCH_ONLY=1 bash benchmarks/gpu_run.sh`.
set -uo pipefail
source .gpu2/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu3/*.whl || exit 1
export PYTHONPATH="$PYTHONPATH:/tmp/site" MLX_PTX_CACHE_DIR=/tmp/ptx
OUT="${OUT:-benchmarks/results}"
if [ -z "${BENCH_ONLY:-}" ]; then
  timeout 400 python tests/gpu/sae_kernels_device.py --steps 150 --sections "${SECTIONS:-kernels,forward,training,trainer}" \
    --out "$OUT/sae_kernels_device.json" 2>&1 | tee "$OUT/sae_kernels_device.log" | grep -v '^\[ok\]'
fi
if [ -z "${SECTIONS:-}" ]; then
  timeout 380 python benchmarks/sae_kernels.py --shapes S1,S2 --steps 20 --warmup 4 --profile \
    --impls fused,fused_fp32bwd,reference,sparsify \
    --out "$OUT/sae_kernels_h100.json" 2>&1 | tee "$OUT/sae_kernels_bench.log"
fi

#!/usr/bin/env bash
# The SAE engine's GPU checks and benchmarks on the GPU machine (one H200; no package registry there).
#
# Here, once (from the repo root): `bash ../shared/device/prepare_mlx_cuda.sh` stages MLX's CUDA wheel in two
# halves (.gpu1/, .gpu2/ with install.sh); sparsify 1.3.3 and its pure-Python dependencies go beside it in .gpu2/:
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .gpu2 eai-sparsify==1.3.3 natsort simple-parsing docstring-parser
# Then two `run` calls back to back (the machine stays warm only 30 s between calls):
#   1. carry [".gpu1"]: mkdir -p ~/.cache/mlx-stash && cp .gpu1/* ~/.cache/mlx-stash/
#   2. carry [".gpu2"]: bash benchmarks/gpu_run.sh          (results land in $OUT)
# A fresh machine JIT-compiles every kernel first (about a minute for the device checks). Each part has its own
# time limit so that one 10-minute call brings back what finished:
#   PARTS="checks trainer" (default) | checks | trainer | trainer-variants
#   checks:           tests/gpu/sae_kernels_device.py, kernel section (every kernel against the reference ops)
#   trainer:          benchmarks/sae_trainer.py with the default settings (the README's table)
#   trainer-variants: the same with the opt-in settings (HOOKED_MLX_SAE_SORT=count, HOOKED_MLX_SAE_SPARSE_BTK=1),
#                     the measurement that decides whether they become defaults
#   memory-variants:  the default trainer alone at S1 and S2 with the memory-related settings changed one at a time:
#                     MLX's donating Adam for W_enc without its copy (HOOKED_MLX_SAE_ADAM_KERNEL=0
#                     HOOKED_MLX_SAE_LOWP_COPIES=W_dec), no copies (HOOKED_MLX_SAE_LOWP_COPIES=), and both
set -uo pipefail
source .gpu2/install.sh >/dev/null || exit 1
export MLX_PTX_CACHE_DIR="$HOME/.cache/mlx-ptx"
OUT="${OUT:-benchmarks/results}"
PARTS="${PARTS:-checks trainer}"
for part in $PARTS; do
  case "$part" in
    checks)
      timeout 200 python tests/gpu/sae_kernels_device.py --sections kernels --out "$OUT/sae_kernels_device_h200.json" \
        2>&1 | grep -v '^\[ok\]' | tail -8 ;;
    trainer)
      timeout 340 python benchmarks/sae_trainer.py --device gpu --device-name "NVIDIA H200" --steps 20 --warmup 5 \
        --json "$OUT/sae_trainer_h200.json" 2>&1 | tee "$OUT/sae_trainer_h200.log" | grep -v -i warn | tail -9 ;;
    trainer-variants)
      HOOKED_MLX_SAE_SORT=count HOOKED_MLX_SAE_SPARSE_BTK=1 timeout 340 python benchmarks/sae_trainer.py --device gpu \
        --device-name "NVIDIA H200" --steps 20 --warmup 5 --json "$OUT/sae_trainer_h200_variants.json" 2>&1 \
        | tee "$OUT/sae_trainer_h200_variants.log" | grep -v -i warn | tail -9 ;;
    memory-variants)
      i=0
      for v in "" "HOOKED_MLX_SAE_ADAM_KERNEL=0 HOOKED_MLX_SAE_LOWP_COPIES=W_dec" "HOOKED_MLX_SAE_LOWP_COPIES=" \
               "HOOKED_MLX_SAE_ADAM_KERNEL=0 HOOKED_MLX_SAE_LOWP_COPIES="; do
        i=$((i + 1))
        echo "== ${v:-defaults}"
        env $v timeout 150 python benchmarks/sae_trainer.py --device gpu --device-name "NVIDIA H200" --steps 20 \
          --warmup 5 --gpu-impls trainer --json "$OUT/sae_trainer_h200_memory_$i.json" 2>&1 | grep ' ms/step'
      done ;;
    *) echo "gpu_run.sh: unknown part $part"; exit 2 ;;
  esac
done

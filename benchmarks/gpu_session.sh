#!/usr/bin/env bash
# The prepared scripts for a lent GPU (see benchmarks/README.md). Run from the repository root on the GPU machine;
# MNIST's four .gz files are in .gpu_carry/ (carried there, never committed). Results go to $OUT.
#   bash benchmarks/gpu_session.sh speed   launch-to-99% with fp32, bf16 and bf16 + torch.compile
#   bash benchmarks/gpu_session.sh race    chapter 01's GAN-vs-diffusion race, preset full, one process per seed;
#                                          merge the parts afterwards with gan_vs_diffusion.py --merge
#   bash benchmarks/gpu_session.sh sweep   step-matched lever sweep: the 1,650 steps that the 20-minute CPU headline
#                                          trains, replayed per lever and seed (ablation.py --steps)
set -uo pipefail
export PYTHONPATH=$PWD DIFFUSION_LAB_DATA=/tmp/mnist_data
mkdir -p "$DIFFUSION_LAB_DATA/MNIST/raw"
for f in .gpu_carry/*.gz; do gunzip -c "$f" > "$DIFFUSION_LAB_DATA/MNIST/raw/$(basename "$f" .gz)"; done
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
case "${1:-speed}" in
    speed)
        # One fresh process per variant, so each pays its own start-up, CUDA initialisation and data loading.
        # Eager variants twice (run-to-run spread), torch.compile once (its compile time dominates).
        for run in "1 speed" "1 speed_bf16" "2 speed" "2 speed_bf16" "1 speed_bf16_compile"; do
            set -- $run
            LAUNCH_T=$(date +%s.%N) python benchmarks/gpu_run.py --out "$OUT/run$1" --phases "$2" 2>&1 | tee -a "$OUT/log.txt"
        done ;;
    race)
        for seed in 0 1 2; do
            python benchmarks/gan_vs_diffusion.py --preset full --seeds $seed --out "$OUT/gvd_full_seed$seed.json" 2>&1 | tee -a "$OUT/gvd_log.txt"
        done ;;
    sweep)
        for seed in 1 2 3; do
            python benchmarks/ablation.py --steps 1650 --seeds $seed --n-eval 2000 \
                --variants no_attention ema_0.995 lr_4e-3 lr_1e-3 p_uncond_0.05 no_ema \
                --out "$OUT/sweep_seed$seed.json" 2>&1 | tee -a "$OUT/sweep_log.txt"
        done ;;
    *) echo "usage: bash benchmarks/gpu_session.sh [speed|race|sweep]" >&2; exit 2 ;;
esac

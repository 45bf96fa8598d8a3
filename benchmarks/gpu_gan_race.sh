#!/usr/bin/env bash
# Chapter 01's stored race on a lent GPU: gan_vs_diffusion.py --preset full, one process per seed (a cut-short
# session keeps the seeds that finished); merge the parts afterwards with --merge (see the script's docstring).
set -uo pipefail
export PYTHONPATH=$PWD DIFFUSION_LAB_DATA=/tmp/mnist_data
mkdir -p $DIFFUSION_LAB_DATA/MNIST/raw
for f in .gpu_carry/*.gz; do gunzip -c "$f" > "$DIFFUSION_LAB_DATA/MNIST/raw/$(basename "$f" .gz)"; done
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
for seed in 0 1 2; do
    python benchmarks/gan_vs_diffusion.py --preset full --seeds $seed --out "$OUT/gvd_full_seed$seed.json" 2>&1 | tee -a "$OUT/gvd_log.txt"
done

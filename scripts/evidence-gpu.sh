#!/usr/bin/env bash
# The full learning-curve grid (issue #14) on one large CUDA GPU: every k, arm and seed of
# config/evidence-gpu.yaml, several trainings side by side on the one GPU.
#
#   bash scripts/evidence-gpu.sh                      # from anywhere; runs in the repository root
#   GPU_JOBS=8 bash scripts/evidence-gpu.sh -n        # fewer side by side; extra arguments go to snakemake
#   EXTRA_CONFIG=mine.yaml bash scripts/evidence-gpu.sh   # config files laid over the preset, in order
#
# GPU_JOBS: how many GPU jobs share the GPU at once (each rule asks for gpu=1); the preset's networks
# are small enough that one alone leaves most of a large GPU idle. CORES: CPU cores for all jobs
# (default: all). SNAKEMAKE: the snakemake command (default: the one on PATH). The report lands in
# <results>/evidence/report/evidence.md.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_JOBS=${GPU_JOBS:-12}
CORES=${CORES:-$(nproc)}
SNAKEMAKE=${SNAKEMAKE:-snakemake}
read -r -a extra <<<"${EXTRA_CONFIG:-}"
exec $SNAKEMAKE evidence --configfile "$PWD/config/evidence-gpu.yaml" "${extra[@]}" --cores "$CORES" "$@" \
    --resources gpu="$GPU_JOBS"

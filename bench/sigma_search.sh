#!/usr/bin/env bash
# The measured search of docs/sweeps.md#a-measured-search: the sigma-VAE recipe (KL weight,
# learning rate, latent size, mixture components) on a cheap proxy (6 epochs, classifier FID
# of 1024 samples), as a TPE study with median pruning and as a grid of 27 points.
#   bench/sigma_search.sh search|grid     (in a clean checkout; the study resumes if stopped)
# Each trial takes one Ray CPU and one torch thread: two trials at a time on a 2-core machine.
# Read the trials back with `bam report --sweep NAME` or `optuna-dashboard .cache/sweeps/optuna.journal`.
set -euo pipefail
COMMON=(-S train.recon=gaussian -S train.epochs=6 -S train.threads=1)
case "${1:-}" in
  search)
    exec bam sweep --name sigma-search --trials 30 --pruner median --prune-on test_recon \
      --warmup 2 --startup 5 "${COMMON[@]}" \
      -S 'train.k2=tag(log, interval(0.02, 1.0))' -S 'train.lr=tag(log, interval(3e-4, 3e-3))' \
      -S 'model.z_dim=choice(8,16,32)' -S 'generate.gmm.components=range(20,201,20)' ;;
  grid)
    exec bam sweep --name sigma-grid "${COMMON[@]}" -S 'train.k2=0.05,0.2,0.5' \
      -S 'train.lr=0.0005,0.001,0.002' -S 'model.z_dim=8,16,32' -S generate.gmm.components=100 ;;
  *) echo "usage: bench/sigma_search.sh search|grid" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Soft-IntroVAE tuned at equal training time (docs/results.md#the-literatures-protocol): a
# `dvc exp` queue over its warm-up length and beta_neg, on the cheap proxy (classifier FID at
# N = 10 000; no Inception), every run with sigma-gmm's decoder and sampler.
#   bench/introvae_search.sh [POINT ...]   (default: the whole grid; queued, run one at a time,
#                                           then the table)
# Warm-up epochs are plain sigma-VAE steps (~4x cheaper than the introspective game's on a
# CPU), so each (warm-up, epochs) pair below costs about sigma-gmm's 30 epochs:
#   10 + 5 game epochs, 20 + 2; warm-up 1 + 6 is literature_table.sh's introvae-sigma. beta_neg
#   (256, the official MNIST value) is then moved both ways at the better warm-up. The finalist
#   goes on the full protocol as bench/literature_table.sh's introvae-tuned row.
set -euo pipefail
COMMON=(-S model.arch=introvae -S train.recon=gaussian -S generate.n=10000
  -S generate.gmm.components=50 -S generate.gmm.max_points=60000)
# point: warm-up epochs:total epochs:beta_neg
declare -A GRID=([w10]=10:15:256 [w20]=20:22:256 [w20-neg1024]=20:22:1024 [w20-neg64]=20:22:64)
git checkout -- params.yaml
for name in "${@:-${!GRID[@]}}"; do
  [[ -v GRID[$name] ]] || { echo "unknown point $name; expected one of ${!GRID[*]}" >&2; exit 2; }
  IFS=: read -r warmup epochs neg <<<"${GRID[$name]}"
  dvc exp run --queue -n "intro-$name" "${COMMON[@]}" -S "model.intro.warmup_epochs=$warmup" \
    -S "train.epochs=$epochs" -S "model.intro.beta_neg=$neg"
done
dvc queue start -j 1  # one at a time: two torch runs on 2 cores slow each other several-fold
while dvc queue status | grep -E 'Queued|Running' >/dev/null; do sleep 60; done  # no -q: an early exit kills dvc (pipefail)
dvc queue status
dvc exp show --no-pager --only-changed --drop 'Created|State|Executor' \
  --keep 'fid_classifier|precision_classifier|recall_classifier|copy_share|test_loss'

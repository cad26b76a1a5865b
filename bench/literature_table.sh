#!/usr/bin/env bash
# The rows of docs/results.md#the-literatures-protocol: each model on the literature's MNIST
# protocol (10 000 samples against the 10 000 test images, Inception pool3 and classifier
# features, fp32), one `dvc exp run` each, in this workspace, one after the other.
#   bench/literature_table.sh [ROW[@SEED] ...]   (default: every row, seed 0; OUT=results folder)
# FEATURES='[classifier]' scores the classifier space only; STAGE=compute-fid stops there (no
# tsne, robustness, inspect); VARIANT=rae32 scores on RAE's published variant (images
# zero-padded to 32 x 32 before Inception, 8-bit samples: fid.pad_to=32, fid.quantize=true),
# in folders and experiments named <row>-rae32; PREFIX names the experiments (lit-<row>).
# ROW@SEED runs the row with every seed of the model and its samples set to SEED (train,
# generate, the mixture's EM); the evaluator's stays 0 so the feature space does not move.
# Each row's metrics/*.json go to $OUT/<row>/ with its wall time; the table is
# `dvc exp show` or those files. Costs on a 2-core CPU: docs/results.md.
set -euo pipefail
OUT=${OUT:-bench/results/literature}
PROTOCOL=(-S generate.n=10000 -S "fid.features=${FEATURES:-[classifier,inception]}")
case "${VARIANT:-}" in
  "") ;;
  rae32) PROTOCOL+=(-S fid.pad_to=32 -S fid.quantize=true) ;;
  *) echo "VARIANT=$VARIANT: expected rae32 or nothing" >&2; exit 2 ;;
esac
declare -A ROWS=(
  [report-gmm]=""
  [report-prior]="-S generate.sampler=prior"
  [cvae]="-S model.arch=cvae"
  [vqvae]="-S model.arch=vqvae"
  [introvae]="-S model.arch=introvae"
  [sigma-gmm]="-S train.recon=gaussian -S train.epochs=30 -S generate.gmm.components=50 -S generate.gmm.max_points=60000"
  # Soft-IntroVAE against sigma-gmm at equal training time: same decoder, sampler and minutes.
  [introvae-sigma]="-S model.arch=introvae -S train.recon=gaussian -S train.epochs=7 -S generate.gmm.components=50 -S generate.gmm.max_points=60000"
  # The finalist of bench/introvae_search.sh (20 plain warm-up epochs, then 2 of the game).
  [introvae-tuned]="-S model.arch=introvae -S train.recon=gaussian -S train.epochs=22 -S model.intro.warmup_epochs=20 -S model.intro.beta_neg=1024 -S generate.gmm.components=50 -S generate.gmm.max_points=60000"
  # The recipe search (docs/results.md, "What was tried"): sigma-gmm wider, with a cosine schedule.
  [sigma-wide]="-S train.recon=gaussian -S train.epochs=30 -S train.lr_schedule=cosine -S model.channels=[64,128] -S generate.gmm.components=50 -S generate.gmm.max_points=60000"
  # The best trial of bench/sigma_search.sh's study (docs/sweeps.md#a-measured-search).
  [searched]="-S train.recon=gaussian -S train.epochs=6 -S train.k2=0.13476510032239455 -S train.lr=0.0022137741964229894 -S model.z_dim=32 -S generate.gmm.components=180"
  # The same recipe on a deeper, wider net with batch norm (3 convolutions, 64-128-256
  # channels, RAE's layer types at a quarter of its width): does a larger decoder lower REC?
  [searched-deep]="-S train.recon=gaussian -S train.epochs=6 -S train.k2=0.13476510032239455 -S train.lr=0.0022137741964229894 -S model.z_dim=32 -S generate.gmm.components=180 -S model.channels=[64,128,256] -S model.batch_norm=true"
  # The same recipe at 3.5x searched-deep's parameters (128-256-512 channels, RAE's width for
  # its first three layers; 6.0 M parameters), 6 epochs: does width alone keep lowering REC?
  [searched-xl]="-S train.recon=gaussian -S train.epochs=6 -S train.k2=0.13476510032239455 -S train.lr=0.0022137741964229894 -S model.z_dim=32 -S generate.gmm.components=180 -S model.channels=[128,256,512] -S model.batch_norm=true"
  # searched-deep trained 2.5x longer with a cosine schedule (15 epochs, ~20-33 minutes on
  # 2 cores): does training time, not only size, lower REC?
  [searched-deep-long]="-S train.recon=gaussian -S train.epochs=15 -S train.lr_schedule=cosine -S train.k2=0.13476510032239455 -S train.lr=0.0022137741964229894 -S model.z_dim=32 -S generate.gmm.components=180 -S model.channels=[64,128,256] -S model.batch_norm=true"
  # searched, sampled by the neural spline flow instead of the mixture (REC says the sampler
  # loses points there: docs/results.md).
  [searched-flow]="-S train.recon=gaussian -S train.epochs=6 -S train.k2=0.13476510032239455 -S train.lr=0.0022137741964229894 -S model.z_dim=32 -S generate.sampler=flow"
  # RAE-L2 (Ghosh et al. 2020) on the report's network: their beta and decoder decay at this
  # loss scale (models/rae.py), 30 epochs, their 10-component mixture.
  [rae]="-S model.arch=rae -S train.k2=0.0049 -S train.epochs=30 -S generate.gmm.components=10"
  # The deterministic autoencoder without either regulariser (their AE row).
  [ae]="-S model.arch=rae -S train.k2=0 -S model.rae.decoder_l2=0 -S train.epochs=30 -S generate.gmm.components=10"
)
ORDER=(report-gmm report-prior cvae vqvae introvae sigma-gmm introvae-sigma introvae-tuned sigma-wide searched searched-deep searched-xl searched-deep-long searched-flow rae ae)
for name in "${@:-${ORDER[@]}}"; do
  row=${name%@*} seed=0
  [[ $name == *@* ]] && seed=${name#*@}
  [[ -v ROWS[$row] ]] || { echo "unknown row $row; expected one of ${ORDER[*]}" >&2; exit 2; }
  [[ $seed =~ ^[0-9]+$ ]] || { echo "bad seed '$seed' in $name; expected ROW@<integer>" >&2; exit 2; }
  SEEDS=()
  (( seed )) && { SEEDS=(-S "train.seed=$seed" -S "generate.seed=$seed" -S "generate.gmm.seed=$seed"); row=$row-seed$seed; }
  [[ -n ${VARIANT:-} ]] && row=$row-$VARIANT
  git checkout -- params.yaml  # every row starts from the committed params
  start=$(date +%s)
  set -f  # a row's words are split but not globbed: they hold lists like [64,128]
  # shellcheck disable=SC2086
  dvc exp run -n "${PREFIX:-lit}-$row" "${PROTOCOL[@]}" ${ROWS[${name%@*}]} "${SEEDS[@]}" ${STAGE:-}
  set +f
  mkdir -p "$OUT/$row"
  cp metrics/*.json models/mlflow_run.json "$OUT/$row/"
  echo "{\"row\": \"$row\", \"wall_s\": $(( $(date +%s) - start )), \"processor\": \"$(lscpu | sed -n 's/^Model name: *//p')\", \"commit\": \"$(git rev-parse --short HEAD)\", \"date\": \"$(date -u +%F)\"}" > "$OUT/$row/run.json"
done
git checkout -- params.yaml

#!/usr/bin/env bash
# The rows of docs/results.md#the-literatures-protocol: each model on the literature's MNIST
# protocol (10 000 samples against the 10 000 test images, Inception pool3 and classifier
# features, fp32), one `dvc exp run` each, in this workspace, one after the other.
#   bench/literature_table.sh [ROW[@SEED] ...]   (default: every row, seed 0; OUT=results folder)
# ROW@SEED runs the row with every seed of the model and its samples set to SEED (train,
# generate, the mixture's EM); the evaluator's stays 0 so the feature space does not move.
# Each row's metrics/*.json go to $OUT/<row>/ with its wall time; the table is
# `dvc exp show` or those files. Costs on a 2-core CPU: docs/results.md.
set -euo pipefail
OUT=${OUT:-bench/results/literature}
PROTOCOL=(-S generate.n=10000 -S 'fid.features=[classifier,inception]')
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
)
ORDER=(report-gmm report-prior cvae vqvae introvae sigma-gmm introvae-sigma introvae-tuned sigma-wide)
for name in "${@:-${ORDER[@]}}"; do
  row=${name%@*} seed=0
  [[ $name == *@* ]] && seed=${name#*@}
  [[ -v ROWS[$row] ]] || { echo "unknown row $row; expected one of ${ORDER[*]}" >&2; exit 2; }
  [[ $seed =~ ^[0-9]+$ ]] || { echo "bad seed '$seed' in $name; expected ROW@<integer>" >&2; exit 2; }
  SEEDS=()
  (( seed )) && { SEEDS=(-S "train.seed=$seed" -S "generate.seed=$seed" -S "generate.gmm.seed=$seed"); row=$row-seed$seed; }
  git checkout -- params.yaml  # every row starts from the committed params
  start=$(date +%s)
  set -f  # a row's words are split but not globbed: they hold lists like [64,128]
  # shellcheck disable=SC2086
  dvc exp run -n "lit-$row" "${PROTOCOL[@]}" ${ROWS[${name%@*}]} "${SEEDS[@]}"
  set +f
  mkdir -p "$OUT/$row"
  cp metrics/*.json models/mlflow_run.json "$OUT/$row/"
  echo "{\"row\": \"$row\", \"wall_s\": $(( $(date +%s) - start )), \"processor\": \"$(lscpu | sed -n 's/^Model name: *//p')\", \"commit\": \"$(git rev-parse --short HEAD)\", \"date\": \"$(date -u +%F)\"}" > "$OUT/$row/run.json"
done
git checkout -- params.yaml

#!/usr/bin/env bash
# The rows of docs/results.md#the-literatures-protocol: each model on the literature's MNIST
# protocol (10 000 samples against the 10 000 test images, Inception pool3 and classifier
# features, fp32), one `dvc exp run` each, in this workspace, one after the other.
#   bench/literature_table.sh [ROW ...]     (default: every row; OUT=folder for the results)
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
)
ORDER=(report-gmm report-prior cvae vqvae introvae sigma-gmm)
for row in "${@:-${ORDER[@]}}"; do
  [[ -v ROWS[$row] ]] || { echo "unknown row $row; expected one of ${ORDER[*]}" >&2; exit 2; }
  git checkout -- params.yaml  # every row starts from the committed params
  start=$(date +%s)
  # shellcheck disable=SC2086
  dvc exp run -n "lit-$row" "${PROTOCOL[@]}" ${ROWS[$row]}
  mkdir -p "$OUT/$row"
  cp metrics/*.json models/mlflow_run.json "$OUT/$row/"
  echo "{\"row\": \"$row\", \"wall_s\": $(( $(date +%s) - start )), \"processor\": \"$(lscpu | sed -n 's/^Model name: *//p')\", \"commit\": \"$(git rev-parse --short HEAD)\", \"date\": \"$(date -u +%F)\"}" > "$OUT/$row/run.json"
done
git checkout -- params.yaml

#!/bin/bash
# Ablation of --recipe best: d2l, best, and best minus one ingredient at a time; one seed each.
# Appends one line per run to ${OUT:-recipe_ablation.jsonl}: name, flags, wall seconds, train.py's --json line.
#
#   MANUAL_DIR=../shared/data/fashion_mnist DATA_DIR=/tmp/tfds bash benchmarks/recipe_ablation.sh
#
# COMMON below is the short CPU setting recorded in BENCHMARKS.md ("Recipe ablation (CPU, one seed: indicative only)");
# on a GPU, set COMMON="" to ablate the full recipe (best's own epochs, batch and size).
set -u
OUT=${OUT:-recipe_ablation.jsonl}
COMMON=${COMMON---train-limit 5000 --test-limit 2000 --resize 28 --epochs 3 --batch-size 128}
DATA="--manual-dir ${MANUAL_DIR:-../shared/data/fashion_mnist} --data-dir ${DATA_DIR:-/tmp/tfds}"
while IFS='|' read -r name flags; do
  start=$(date +%s)
  line=$(python train.py $DATA $COMMON --seed ${SEED:-0} --json $flags | tail -1)
  echo "{\"name\": \"$name\", \"flags\": \"$flags\", \"secs\": $(( $(date +%s) - start )), \"result\": ${line:-null}}" >> "$OUT"
done <<'LIST'
d2l|--recipe d2l
best|--recipe best
no_erase|--recipe best --erase-prob 0
no_flip|--recipe best --no-flip
no_crop|--recipe best --crop-pad 0
no_tta|--recipe best --no-tta-flip
no_ema|--recipe best --ema-decay 0
no_ls|--recipe best --label-smoothing 0
no_wd|--recipe best --weight-decay 0
constant_lr|--recipe best --schedule constant --warmup-epochs 0
LIST

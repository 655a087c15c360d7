#!/usr/bin/env bash
# The paper's other ablations (issue 24), each a `make sweep` of one key into one MLflow
# experiment of their own, then `mae-cli compare --by KEY --json` of each into OUT
# (default results/ablations-<date>). A full run takes about an hour on a 2-core CPU.
#   scripts/ablation_sweeps.sh [OUT]
# (The 2026-12-01 runs were made before `make sweep EXPERIMENT=` existed, with
# SET='-S tracking.experiment=...': the same runs; its closing compare then failed.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/ablations-$(date +%F)}
EXP=${EXP:-ablations-$(date +%F)}
mkdir -p "$OUT"
sweep() {  # name key values [more -S]
  local name=$1 key=$2 values=$3
  shift 3
  local start=$SECONDS
  make sweep KEY="$key" VALUES="$values" EXPERIMENT="$EXP" SET="$*" > "$OUT/$name.log" 2>&1
  echo "{\"sweep\": \"$name\", \"key\": \"$key\", \"values\": \"$values\", \"extra\": \"$*\", \"minutes\": $(( (SECONDS - start) / 60 ))}" >> "$OUT/sweeps.jsonl"
}
sweep mask-type pretrain.mask_type random,block,grid
sweep block-half pretrain.mask_ratio 0.5 -S pretrain.mask_type=block
sweep partial-finetune finetune.trainable_blocks 0,1,2
sweep decoder-depth model.decoder_depth 1,4
for key in pretrain.mask_type finetune.trainable_blocks model.decoder_depth; do
  .venv/bin/mae-cli compare --experiment "$EXP" --by "$key" --json \
    --out "$OUT/compare-${key##*.}.png" > "$OUT/compare-${key##*.}.json"
done

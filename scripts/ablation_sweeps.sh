#!/usr/bin/env bash
# The paper's other ablations (issue 24), each a `make sweep` of one key into one MLflow
# experiment, then `mae-cli compare --by KEY --json` of each into OUT (default
# results/ablations-<date>). A full run takes about 50 minutes on a 2-core CPU.
#   scripts/ablation_sweeps.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/ablations-$(date +%F)}
EXP=${EXP:-ablations-$(date +%F)}
mkdir -p "$OUT"
sweep() {  # name key values [more -S]
  local name=$1 key=$2 values=$3
  shift 3
  local start=$SECONDS
  # its closing `mae-cli compare` reads params.yaml's experiment, not $EXP: compared below
  make sweep KEY="$key" VALUES="$values" SET="-S tracking.experiment=$EXP $*" \
    > "$OUT/$name.log" 2>&1 || true
  echo "{\"sweep\": \"$name\", \"key\": \"$key\", \"values\": \"$values\", \"extra\": \"$*\", \"minutes\": $(( (SECONDS - start) / 60 ))}" >> "$OUT/sweeps.jsonl"
}
[ -n "${SKIP_MASK_TYPE:-}" ] || sweep mask-type pretrain.mask_type random,block,grid
sweep block-half pretrain.mask_ratio 0.5 -S pretrain.mask_type=block
sweep partial-finetune finetune.trainable_blocks 0,1,2
sweep decoder-depth model.decoder_depth 1,4
for key in pretrain.mask_type finetune.trainable_blocks model.decoder_depth; do
  .venv/bin/mae-cli compare --params <(sed "s/^  experiment: .*/  experiment: $EXP/" params.yaml) \
    --by "$key" --json --out "$OUT/compare-${key##*.}.png" > "$OUT/compare-${key##*.}.json"
done

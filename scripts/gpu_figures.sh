#!/usr/bin/env bash
# The GPU figures of the README, in parts that fit short GPU leases:
#   scripts/gpu_figures.sh bench OUT        ViT-B/16 and ViT-L/16 at 224 px, batch 256: the
#                                           official step (fp16 + loss scaling, eager) beside
#                                           ours (bf16, fused AdamW) eager and compiled
#   scripts/gpu_figures.sh tests OUT        make test-gpu's tests
#   scripts/gpu_figures.sh loader OUT       shard Fashion-MNIST, then the recipe model's step
#                                           fed by the real loader (data wait vs compute)
#   scripts/gpu_figures.sh recipe OUT PT FT [section.key=value ...]
#                                           the GPU recipe cut to PT pretrain and FT finetune
#                                           epochs (warm-ups 5 %) (the full one: `make gpu-run`)
# PYTHON names the interpreter (default: the project's .venv, else python3); DATA_ROOT the
# Fashion-MNIST files (default: params.yaml's). Each figure is one JSON line in OUT.
set -uo pipefail
part=$1 out=$2
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$out"
cli() { "$py" -m pipeline.cli "$@"; }

# params.yaml with the GPU recipe and the given overrides merged in, checked like params.yaml
gpu_params() {
    "$py" - "$@" <<'PY'
import sys, yaml
from pipeline.params import merge, parse_params, read_yaml
params = merge(read_yaml("params.yaml"), read_yaml("recipes/fashion-mnist-gpu.yaml"))
for arg in sys.argv[1:]:
    key, value = arg.split("=", 1)
    section, name = key.split(".")
    params = merge(params, {section: {name: yaml.safe_load(value)}})
parse_params(params)
yaml.safe_dump(params, open("gpu-params.yaml", "w"), sort_keys=False)
PY
}

case $part in
bench)
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      "$py" -c "import sys, torch, timm; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
      echo "cpus $(nproc)"; } | tee "$out/env.txt"
    for model in mae_vit_base_patch16 mae_vit_large_patch16; do
        for args in "--precision fp16 --no-baseline" "--precision bf16" \
                    "--precision bf16 --compile --no-baseline"; do
            # shellcheck disable=SC2086
            timeout 200 "$py" -m pipeline.cli bench step --model $model --batch-size 256 --steps 20 $args --json \
                | tee -a "$out/bench.jsonl" || echo "FAILED: $model $args"
        done
    done
    ;;
tests)
    timeout 300 "$py" -m pytest -m gpu -p no:cacheprovider -ra 2>&1 | tee "$out/test-gpu.log"
    ;;
loader)
    gpu_params ${DATA_ROOT:+data.root=$DATA_ROOT}
    time cli shard --params gpu-params.yaml
    timeout 200 "$py" -m pipeline.cli bench step --model mae_vit_s_patch4_28 --batch-size 1024 --data shards \
        --params gpu-params.yaml --steps 50 --json | tee -a "$out/bench.jsonl"
    ;;
recipe)
    gpu_params ${DATA_ROOT:+data.root=$DATA_ROOT} "pretrain.epochs=$3" "finetune.epochs=$4" \
        "pretrain.probe_every=$(( ($3 + 3) / 4 ))" "pretrain.warmup_epochs=$(( ($3 + 19) / 20 ))" \
        "finetune.warmup_epochs=$(( ($4 + 19) / 20 ))" "${@:5}"
    [ -f data/shards/manifest.json ] || cli shard --params gpu-params.yaml
    for stage in pretrain finetune linprobe evaluate; do
        SECONDS=0
        cli "$stage" --params gpu-params.yaml || { echo "FAILED: $stage"; break; }
        echo "{\"stage\": \"$stage\", \"seconds\": $SECONDS}" | tee -a "$out/minutes.jsonl"
    done
    tar czf "$out/recipe.tar.gz" gpu-params.yaml metrics plots/*/*.csv
    ;;
*) echo "usage: $0 bench|tests|loader|recipe OUT [PT FT]" >&2; exit 2 ;;
esac

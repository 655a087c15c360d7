#!/usr/bin/env bash
# The GPU figures of the README, in parts that fit short GPU leases:
#   scripts/gpu_figures.sh bench OUT        ViT-B/16 and ViT-L/16 at 224 px, batch 256: the
#                                           official step (fp16 + loss scaling, eager) beside
#                                           ours (bf16, fused AdamW) eager and compiled
#   scripts/gpu_figures.sh tests OUT        make test-gpu's tests
# The GPU recipe itself, with its loader figures, is one call: scripts/gpu_record.py.
# PYTHON names the interpreter (default: the project's .venv, else python3). Each figure is
# one JSON line in OUT.
set -uo pipefail
part=$1 out=$2
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$out"

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
*) echo "usage: $0 bench|tests OUT" >&2; exit 2 ;;
esac

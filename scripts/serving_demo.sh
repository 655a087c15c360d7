#!/usr/bin/env bash
# The serving figures of the README (results/serving-*/): three real Fashion-MNIST test
# images through `mae-cli predict`, the finetune model registered with alias champion,
# served by `mlflow models serve` and asked over HTTP. Run after `make run`:
#   scripts/serving_demo.sh results/serving-$(date +%F)
set -euo pipefail
out=${1:?usage: scripts/serving_demo.sh OUT}
mkdir -p "$out/images"
source .venv/bin/activate
python - "$out/images" <<'PY'
import gzip, sys
from pathlib import Path
import numpy as np
from PIL import Image
root, out = Path("/usr/share/datasets/fashion-mnist"), Path(sys.argv[1])
names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
images = np.frombuffer(gzip.open(root / "t10k-images-idx3-ubyte.gz").read()[16:], np.uint8).reshape(-1, 28, 28)
labels = np.frombuffer(gzip.open(root / "t10k-labels-idx1-ubyte.gz").read()[8:], np.uint8)
for i in (0, 1, 2):
    Image.fromarray(images[i], "L").save(out / f"t10k-{i:05d}.png")
    print(f"t10k-{i:05d}.png true class: {names[labels[i]]}")
PY
finetune=$(cat models/finetune/run_id)
pretrain=$(cat models/pretrain/run_id)
{ echo "\$ mae-cli predict --run-id $finetune $out/images --top-k 2"
  mae-cli predict --run-id "$finetune" "$out/images" --top-k 2; } | tee "$out/predict.txt"
sed 's/^  register: null/  register: fashion-mnist/' params.yaml > "$out/params-register.yaml"
mae-cli evaluate --params "$out/params-register.yaml" --run-id "$pretrain" --json > "$out/evaluate-register.json"
python -c "import json; [print(r['stage'], r.get('registered')) for r in json.load(open('$out/evaluate-register.json'))]"
port=5123
mlflow models serve -m models:/fashion-mnist@champion --env-manager local -h 127.0.0.1 -p $port > "$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
start=$(date +%s.%N)
until curl -sf 127.0.0.1:$port/ping >/dev/null; do sleep 0.5; done
echo "server answered /ping after $(python -c "print(round($(date +%s.%N) - $start, 1))") s" | tee "$out/serve-start.txt"
body=$(python -c "import base64, json, sys; print(json.dumps({'dataframe_split': {'columns': ['image'], 'data': [[base64.b64encode(open(p, 'rb').read()).decode()] for p in sys.argv[1:]]}}))" "$out"/images/t10k-0000{0,1}.png)
echo "\$ curl -s 127.0.0.1:$port/invocations -H 'Content-Type: application/json' -d '{\"dataframe_split\": {\"columns\": [\"image\"], \"data\": [[<base64 of t10k-00000.png>], [<base64 of t10k-00001.png>]]}}'" > "$out/invocations.txt"
curl -s 127.0.0.1:$port/invocations -H 'Content-Type: application/json' -d "$body" | tee -a "$out/invocations.txt"
echo
mae-cli evaluate --run-id "$finetune" --predictions "$out/predictions" > /dev/null
grep -E "^(key|00000000|00000001)," "$out/predictions/$finetune.csv" > "$out/evaluate-rows.csv" || true
rm -r "$out/predictions"

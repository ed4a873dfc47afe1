#!/usr/bin/env bash
# The main job, end to end on real data: set up, fetch the Debian data packages, build the
# Fashion-MNIST and emoji shards, train a CLIP model on each, evaluate it by the protocol.
#   scripts/quickstart.sh          ~5 minutes of training per data set
#   scripts/quickstart.sh --fast   ~1 minute per data set
# Re-running reuses the virtualenv and the shards; each run trains into a new runs/ folder.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=5
[ "${1:-}" = "--fast" ] && MINUTES=1
source scripts/setup.sh ""  # an explicit (empty) extras argument: a sourced script otherwise sees ours

clipper data fetch
[ -f data/shards/fmnist/test/sizes.json ] || clipper data fashion-mnist --out data/shards/fmnist
[ -f data/shards/emoji/test/sizes.json ] || clipper data emoji --out data/shards/emoji

stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p runs
for set in fmnist emoji; do
  preset=$([ $set = fmnist ] && echo fmnist-tiny || echo emoji-small)
  task=$([ $set = fmnist ] && echo zeroshot-fmnist || echo retrieval-emoji)
  run="runs/quickstart-$set-$stamp"
  echo "== training $preset for $MINUTES minute(s) on data/shards/$set/train -> $run"
  clipper train --preset "$preset" --minutes "$MINUTES" --train-data "data/shards/$set/train" \
    --eval-data "data/shards/$set/test" --out "$run" > "$run.summary.json"
  clipper eval --model "$run/model" --task "$task" --data "data/shards/$set/test" > "$run.eval.json"
done

echo
echo "== results (this run; training curves in runs/quickstart-*-$stamp/curves.png)"
python - "$stamp" <<'PY'
import json, sys
stamp = sys.argv[1]
rows = []
for data in ("fmnist", "emoji"):
    run = f"runs/quickstart-{data}-{stamp}"
    summary = json.loads(open(run + ".summary.json").read().strip().splitlines()[-1])
    metrics = json.load(open(run + ".eval.json"))
    shown = {k: v for k, v in metrics.items() if k not in ("model", "task", "n")}
    rows.append((data, summary["train_seconds"], summary["samples"], summary["samples_per_s"],
                 ", ".join(f"{k} {v:.1f}%" for k, v in shown.items())))
print(f"{'data':8s} {'train s':>8s} {'samples':>9s} {'samples/s':>10s}  test metrics")
for data, secs, samples, rate, metrics in rows:
    print(f"{data:8s} {secs:8.0f} {samples:9d} {rate:10.0f}  {metrics}")
PY
